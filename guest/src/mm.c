/*
 * Memory: read hvm_start_info, build the full identity map, and carve the
 * generation array and the working set out of free RAM.
 *
 * Runs on the BSP only, before the APs are released, on the static boot
 * page tables (first 1 GiB identity-mapped).
 */
#include "guest.h"

struct memory mem;

#define HVM_START_MAGIC 0x336ec578
#define E820_RAM 1
#define GIB (1ULL << 30)
#define MIB2 (1ULL << 21)
#define BOOT_MAP_END GIB        /* what the boot page tables cover */
#define PHYS_LIMIT (512 * GIB)  /* one PDPT: physical memory we can map */
#define APIC_MMIO_START 0xfec00000ULL
#define VIRTIO_MMIO_START 0xfe000000ULL /* 2 MiB of virtio-mmio windows */
#define APIC_MMIO_END (4 * GIB)

#define PTE_P 0x1ULL
#define PTE_W 0x2ULL
#define PTE_U 0x4ULL /* the workload runs in ring 3 */
#define PTE_PWT 0x8ULL
#define PTE_PCD 0x10ULL
#define PTE_PS 0x80ULL

struct hvm_start_info {
	u32 magic;
	u32 version;
	u32 flags;
	u32 nr_modules;
	u64 modlist_paddr;
	u64 cmdline_paddr;
	u64 rsdp_paddr;
	u64 memmap_paddr; /* version >= 1 */
	u32 memmap_entries;
	u32 reserved;
};

struct hvm_memmap_entry {
	u64 addr;
	u64 size;
	u32 type;
	u32 reserved;
};

#define MAX_RANGES 32

struct range {
	u64 start, end;
};

/* RAM as the memmap reports it (sorted), and what is still free. */
static struct range ram[MAX_RANGES];
static u32 nram;
static struct range free_ram[MAX_RANGES];
static u32 nfree;

static bool below_boot_map(u64 pa, u64 len)
{
	return pa < BOOT_MAP_END && len <= BOOT_MAP_END - pa;
}

static void add_ram(u64 start, u64 end)
{
	if (end <= start || nram == MAX_RANGES)
		return;
	/* Insertion sort by start address. */
	u32 i = nram++;
	while (i > 0 && ram[i - 1].start > start) {
		ram[i] = ram[i - 1];
		i--;
	}
	ram[i] = (struct range){ start, end };
	mem.ram_bytes += end - start;
}

void start_info_read(u64 pa, char *cmdline, size_t cmdline_size)
{
	cmdline[0] = 0;
	const struct hvm_start_info *si = (const struct hvm_start_info *)pa;
	if (!below_boot_map(pa, sizeof(*si)) || si->magic != HVM_START_MAGIC) {
		bad("FERRY BAD start_info pa=0x%lx\n", pa);
		add_ram(0, 64ULL << 20); /* guess, so we can still run */
		return;
	}

	if (si->cmdline_paddr && below_boot_map(si->cmdline_paddr, 1)) {
		const char *s = (const char *)si->cmdline_paddr;
		size_t n = 0;
		while (n + 1 < cmdline_size && si->cmdline_paddr + n < BOOT_MAP_END && s[n]) {
			cmdline[n] = s[n];
			n++;
		}
		cmdline[n] = 0;
	}

	u64 entries = si->version >= 1 ? si->memmap_entries : 0;
	const struct hvm_memmap_entry *mm = (const struct hvm_memmap_entry *)si->memmap_paddr;
	if (entries == 0 || !below_boot_map(si->memmap_paddr, entries * sizeof(*mm))) {
		bad("FERRY BAD memmap version=%u entries=%lu\n", si->version, entries);
		add_ram(0, 64ULL << 20);
		return;
	}
	for (u64 i = 0; i < entries; i++)
		if (mm[i].type == E820_RAM && mm[i].size)
			add_ram(mm[i].addr, mm[i].addr + mm[i].size);
}

/* Bottom-up allocation of `pages` contiguous pages below `limit`. */
static u64 alloc_low(u64 pages, u64 limit)
{
	u64 bytes = pages * PAGE_SIZE;
	for (u32 i = 0; i < nfree; i++) {
		struct range *r = &free_ram[i];
		if (r->end - r->start >= bytes && r->start + bytes <= limit) {
			u64 pa = r->start;
			r->start += bytes;
			return pa;
		}
	}
	return 0;
}

static u64 free_pages(void)
{
	u64 n = 0;
	for (u32 i = 0; i < nfree; i++)
		n += (free_ram[i].end - free_ram[i].start) / PAGE_SIZE;
	return n;
}

static bool frame_is_ram(u64 pa)
{
	for (u32 i = 0; i < nram; i++)
		if (ram[i].start < pa + MIB2 && pa < ram[i].end)
			return true;
	return false;
}

/*
 * Identity map, 2 MiB pages: every 2 MiB frame that overlaps RAM
 * (write-back) plus 0xfec00000-4G for the IOAPIC/LAPIC (uncached).
 */
static void build_page_tables(void)
{
	bool need[512] = { false };
	u32 npd = 0;
	for (u32 i = 0; i < nram; i++)
		for (u64 g = ram[i].start / GIB; g <= (ram[i].end - 1) / GIB && g < 512; g++)
			need[g] = true;
	need[APIC_MMIO_START / GIB] = true;
	for (u32 g = 0; g < 512; g++)
		npd += need[g];

	u64 base = alloc_low(2 + npd, BOOT_MAP_END);
	if (!base) {
		kprintf_fatal("FERRY BAD mm no room for page tables\n");
		halt_forever();
	}
	memset((void *)base, 0, (2 + npd) * PAGE_SIZE);
	u64 *pml4 = (u64 *)base;
	u64 *pdpt = (u64 *)(base + PAGE_SIZE);
	u64 *pd = (u64 *)(base + 2 * PAGE_SIZE);
	pml4[0] = (u64)pdpt | PTE_P | PTE_W | PTE_U;
	for (u32 g = 0; g < 512; g++) {
		if (!need[g])
			continue;
		pdpt[g] = (u64)pd | PTE_P | PTE_W | PTE_U;
		for (u32 j = 0; j < 512; j++) {
			u64 pa = (u64)g * GIB + (u64)j * MIB2;
			if (pa == VIRTIO_MMIO_START) /* user: ring 3 notifies */
				pd[j] = pa | PTE_P | PTE_W | PTE_U | PTE_PS | PTE_PCD | PTE_PWT;
			else if (pa >= APIC_MMIO_START && pa < APIC_MMIO_END)
				pd[j] = pa | PTE_P | PTE_W | PTE_PS | PTE_PCD | PTE_PWT; /* kernel only */
			else if (frame_is_ram(pa))
				pd[j] = pa | PTE_P | PTE_W | PTE_U | PTE_PS;
		}
		pd += 512;
	}
	mem.pml4_pa = base;
}

void mm_setup(void)
{
	/* Free RAM: everything above the image, page-aligned, mappable. */
	u64 image_end = ALIGN_UP((u64)_end, PAGE_SIZE);
	for (u32 i = 0; i < nram; i++) {
		u64 s = MAX(ALIGN_UP(ram[i].start, PAGE_SIZE), image_end);
		u64 e = MIN(ALIGN_DOWN(ram[i].end, PAGE_SIZE), PHYS_LIMIT);
		if (s < e)
			free_ram[nfree++] = (struct range){ s, e };
	}

	build_page_tables();
	write_cr3(mem.pml4_pa); /* all RAM is reachable from here on */
	mem.dma_pa = alloc_low(DMA_PAGES, BOOT_MAP_END);

	/* Working set request, clamped to what is free. */
	u64 want = MAX(cfg.ws_bytes / PAGE_SIZE, cfg.cpus);
	want = MIN(want, free_pages());
	u64 gen_pages = 0, gen_pa = 0;
	for (; want; want /= 2) {
		gen_pages = ALIGN_UP(want * sizeof(u32), PAGE_SIZE) / PAGE_SIZE;
		gen_pa = alloc_low(gen_pages, PHYS_LIMIT);
		if (gen_pa)
			break;
	}
	mem.gen = (u32 *)gen_pa;
	want = MIN(want, free_pages());
	want -= want % cfg.cpus;

	/* Working-set pages come from the top of RAM down, so big guests
	 * exercise memory above 4 GiB.  Page numbers rise with addresses
	 * within a segment. */
	u64 next = 0;
	for (u32 i = nfree; i-- > 0 && next < want && mem.nsegs < MAX_SEGS;) {
		struct range *r = &free_ram[i];
		u64 take = MIN(want - next, (r->end - r->start) / PAGE_SIZE);
		if (!take)
			continue;
		r->end -= take * PAGE_SIZE;
		mem.segs[mem.nsegs++] = (struct ws_seg){ r->end, next, take };
		next += take;
	}
	/* Out of segment slots: trim to a multiple of cpus. */
	for (u64 extra = next % cfg.cpus; extra;) {
		struct ws_seg *sg = &mem.segs[mem.nsegs - 1];
		u64 cut = MIN(extra, sg->pages);
		sg->pages -= cut;
		next -= cut;
		extra -= cut;
		if (!sg->pages)
			mem.nsegs--;
	}
	mem.ws_pages = next;
	if (!next) {
		kprintf_fatal("FERRY BAD mm no memory for the working set\n");
		halt_forever();
	}
}
