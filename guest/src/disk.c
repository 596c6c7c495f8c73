/*
 * virtio-mmio block driver (split virtqueue, polled) and the disk workload.
 *
 * The VMM describes its devices on the command line, Linux style
 * (`virtio_mmio.device=4K@0xfe000000:10`).  With `disk=1`, the BSP sets
 * the first device up in ring 0 at boot (registers only), and vCPU 0's
 * ring-3 workload then drives the disk between its page rounds:
 *
 *  - block b (4 KiB = 8 sectors) at generation g holds word 0 = DISK_MAGIC,
 *    word 1 = b, word 2 = g, word i>=3 = mix64(disk_seed(b, g) + i)
 *    (guest/src/lib.rs `disk_block` is the reference, for offline checks);
 *  - first every block is written at generation 1; then batches of
 *    `disk_batch` requests on distinct random blocks, each a read (checked
 *    against the generation kept in RAM, disk_gen[]) or a write of the
 *    next generation (which becomes current when the device completes it);
 *  - every used-ring entry must name a request in flight, once: a request
 *    completed twice or one that was never made is `FERRY BAD disk`;
 *  - with `disk_bad=1`, every fourth batch is followed by one malformed
 *    chain (ten kinds, in turn) that must come back with an error status,
 *    or with length 0 and no status when it has no usable status byte.
 *
 * Every report prints `FERRY DISK <ops> <errors> <malformed> <rejected>`.
 * With `disk_ops=N` the workload stops after N operations and prints the
 * generation of every block (`FERRY DISKGEN <first> <g>...`, 16 per line)
 * and `FERRY DISKEND <ops> <errors> <blocks>`, so a test can check the
 * disk file offline.
 */
#include "guest.h"

#define MAX_VDEV 8
#define QSIZE 32
#define SLOTS 8           /* ordinary requests in flight at most */
#define BAD_SLOT SLOTS    /* descriptors 3*SLOTS.. are the malformed chain's */
#define BLOCK_BYTES 4096
#define SECTORS_PER_BLOCK 8
#define DISK_MAX_BLOCKS 4096
#define DISK_MAGIC 0x4b4c425952524546ULL /* "FERRYBLK", little-endian */

/* virtio-mmio registers */
#include "virtio_mmio.h"

#define S_ACK 1
#define S_DRIVER 2
#define S_DRIVER_OK 4
#define S_FEATURES_OK 8

#define F_FLUSH 9

#define T_IN 0
#define T_OUT 1
#define T_FLUSH 4
#define T_GET_ID 8

#define DESC_NEXT 1
#define DESC_WRITE 2

struct vdesc {
	u64 addr;
	u32 len;
	u16 flags;
	u16 next;
};

struct vavail {
	u16 flags;
	u16 idx;
	u16 ring[QSIZE];
};

struct vused_elem {
	u32 id;
	u32 len;
};

struct vused {
	u16 flags;
	u16 idx;
	struct vused_elem ring[QSIZE];
};

struct blk_hdr {
	u32 type;
	u32 reserved;
	u64 sector;
};

struct slot {
	bool busy;
	bool write;
	u32 type;
	u64 block;
	u32 gen; /* generation written, or expected by a read */
};

static u64 vdev_base[MAX_VDEV];
static u32 nvdev;

static struct {
	bool on;
	bool finished;
	u64 base;
	volatile struct vdesc *desc;
	volatile struct vavail *avail;
	volatile struct vused *used;
	volatile struct blk_hdr *hdr;  /* per slot, slots + 1 */
	volatile u8 *status;          /* per slot */
	u64 data_pa;                  /* slot s's data page: data_pa + s * 4K */
	u16 avail_idx, used_seen;
	u64 sectors, blocks;
	u64 ops, errors, malformed, rejected, batches;
	u64 rng;
	struct slot slots[SLOTS + 1];
	char serial[24];
} d;

/* Generations, in RAM: they move with the guest. */
static u32 disk_gen[DISK_MAX_BLOCKS];

/* ------------------------------------------------------------ cmdline */

static bool parse_hex(const char *s, size_t len, u64 *out)
{
	if (len < 3 || s[0] != '0' || (s[1] != 'x' && s[1] != 'X'))
		return false;
	u64 v = 0;
	for (size_t i = 2; i < len; i++) {
		char c = s[i];
		u64 x;
		if (c >= '0' && c <= '9')
			x = (u64)(c - '0');
		else if (c >= 'a' && c <= 'f')
			x = (u64)(c - 'a' + 10);
		else if (c >= 'A' && c <= 'F')
			x = (u64)(c - 'A' + 10);
		else
			return false;
		if (v >> 60)
			return false;
		v = v << 4 | x;
	}
	*out = v;
	return true;
}

bool virtio_mmio_option(const char *v, size_t len)
{
	/* <size>@<base>:<irq> */
	size_t at = 0, colon = len;
	while (at < len && v[at] != '@')
		at++;
	for (size_t i = at; i < len; i++)
		if (v[i] == ':')
			colon = i;
	u64 base;
	if (at == len || !parse_hex(v + at + 1, colon - at - 1, &base))
		return false;
	if (nvdev < MAX_VDEV)
		vdev_base[nvdev++] = base;
	return true;
}

u32 virtio_count(void)
{
	return nvdev;
}

u64 virtio_base(u32 i)
{
	return i < nvdev ? vdev_base[i] : 0;
}

/* ----------------------------------------------------------- patterns */

static inline u64 disk_seed(u64 block, u32 gen)
{
	return mix64((block << 32) ^ gen ^ 0xd15c0000d15cULL);
}

static void fill_block(volatile u64 *w, u64 block, u32 gen)
{
	u64 s = disk_seed(block, gen);
	w[0] = DISK_MAGIC;
	w[1] = block;
	w[2] = gen;
	for (u32 i = 3; i < BLOCK_BYTES / 8; i++)
		w[i] = mix64(s + i);
}

/* Returns true when the block holds generation gen. */
static bool check_block(volatile u64 *w, u64 block, u32 gen)
{
	u64 s = disk_seed(block, gen);
	u32 nbad = 0, first = 0;
	for (u32 i = 0; i < BLOCK_BYTES / 8; i++) {
		u64 want = i == 0 ? DISK_MAGIC : i == 1 ? block : i == 2 ? gen : mix64(s + i);
		if (w[i] != want && !nbad++)
			first = i;
	}
	if (!nbad)
		return true;
	bad("FERRY BAD disk block=%lu want_gen=%u got_block=%lu got_gen=%lu word=%u bad_words=%u\n",
	    block, gen, w[1], w[2], first, nbad);
	return false;
}

/* ------------------------------------------------------------- driver */

static inline u32 rd(u32 off)
{
	return mmio_read32(d.base + off);
}

static inline void wr(u32 off, u32 v)
{
	mmio_write32(d.base + off, v);
}

static inline u64 data_pa(u32 slot)
{
	return d.data_pa + (u64)slot * PAGE_SIZE;
}

/* Ring 0, BSP, at boot: the device's registers. */
void disk_init(u64 dma_pa)
{
	if (!cfg.disk)
		return;
	if (!nvdev) {
		bad("FERRY BAD disk no virtio_mmio.device on the command line\n");
		return;
	}
	d.base = vdev_base[0];
	u32 magic = rd(R_MAGIC), version = rd(R_VERSION), id = rd(R_DEVICE_ID);
	if (magic != 0x74726976 || version != 2 || id != 2) {
		bad("FERRY BAD disk probe magic=0x%x version=%u id=%u\n", magic, version, id);
		return;
	}
	wr(R_STATUS, 0);
	wr(R_STATUS, S_ACK);
	wr(R_STATUS, S_ACK | S_DRIVER);
	wr(R_DEV_FEATURES_SEL, 1);
	u32 f1 = rd(R_DEV_FEATURES);
	wr(R_DEV_FEATURES_SEL, 0);
	u32 f0 = rd(R_DEV_FEATURES);
	if (!(f1 & 1)) {
		bad("FERRY BAD disk no VERSION_1 features=0x%x:%x\n", f1, f0);
		return;
	}
	wr(R_DRV_FEATURES_SEL, 0);
	wr(R_DRV_FEATURES, f0 & (1u << F_FLUSH));
	wr(R_DRV_FEATURES_SEL, 1);
	wr(R_DRV_FEATURES, 1);
	wr(R_STATUS, S_ACK | S_DRIVER | S_FEATURES_OK);
	if (!(rd(R_STATUS) & S_FEATURES_OK)) {
		bad("FERRY BAD disk features refused\n");
		return;
	}
	wr(R_QUEUE_SEL, 0);
	u32 max = rd(R_QUEUE_NUM_MAX);
	if (max < QSIZE) {
		bad("FERRY BAD disk queue max=%u\n", max);
		return;
	}
	d.desc = (volatile struct vdesc *)dma_pa;
	d.avail = (volatile struct vavail *)(dma_pa + PAGE_SIZE);
	d.used = (volatile struct vused *)(dma_pa + 2 * PAGE_SIZE);
	d.hdr = (volatile struct blk_hdr *)(dma_pa + 3 * PAGE_SIZE);
	d.status = (volatile u8 *)(dma_pa + 3 * PAGE_SIZE + 2048);
	d.data_pa = dma_pa + 4 * PAGE_SIZE;
	/* The DMA pages are fresh RAM: the rings start zeroed. */
	wr(R_QUEUE_NUM, QSIZE);
	wr(R_QUEUE_DESC, (u32)(u64)d.desc);
	wr(R_QUEUE_DESC + 4, (u32)((u64)d.desc >> 32));
	wr(R_QUEUE_AVAIL, (u32)(u64)d.avail);
	wr(R_QUEUE_AVAIL + 4, (u32)((u64)d.avail >> 32));
	wr(R_QUEUE_USED, (u32)(u64)d.used);
	wr(R_QUEUE_USED + 4, (u32)((u64)d.used >> 32));
	wr(R_QUEUE_READY, 1);
	wr(R_STATUS, S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
	d.sectors = rd(R_CONFIG) | (u64)rd(R_CONFIG + 4) << 32;
	d.blocks = MIN(MIN(cfg.disk_blocks, d.sectors / SECTORS_PER_BLOCK), DISK_MAX_BLOCKS);
	if (!d.blocks) {
		bad("FERRY BAD disk too small sectors=%lu\n", d.sectors);
		return;
	}
	d.rng = mix64(cfg.seed ^ 0xd15c);
	d.on = true;
}

/* Puts chain `head` in the avail ring and notifies (ring 3). */
static void publish(u16 head)
{
	d.avail->ring[d.avail_idx % QSIZE] = head;
	d.avail_idx++;
	__atomic_store_n(&d.avail->idx, d.avail_idx, __ATOMIC_RELEASE);
}

static void notify(void)
{
	__atomic_thread_fence(__ATOMIC_SEQ_CST);
	wr(R_QUEUE_NOTIFY, 0);
}

/* The three-descriptor chain of slot s: header, data, status. */
static u16 chain(u32 s, u32 type, u64 sector, u32 data_len, bool device_writes)
{
	u16 h = (u16)(3 * s);
	d.hdr[s].type = type;
	d.hdr[s].reserved = 0;
	d.hdr[s].sector = sector;
	d.status[s] = 0xff;
	d.desc[h] = (struct vdesc){ (u64)&d.hdr[s], sizeof(struct blk_hdr), DESC_NEXT, (u16)(h + 1) };
	d.desc[h + 1] = (struct vdesc){ data_pa(s), data_len,
					(u16)(DESC_NEXT | (device_writes ? DESC_WRITE : 0)), (u16)(h + 2) };
	d.desc[h + 2] = (struct vdesc){ (u64)&d.status[s], 1, DESC_WRITE, 0 };
	return h;
}

/*
 * Takes every new used entry; returns how many were for slots in flight.
 * An entry for no request in flight (a completion done twice, or never
 * asked for) is BAD.
 */
static u32 reap(void (*done)(u32 slot, u32 len))
{
	u32 n = 0;
	u16 idx = __atomic_load_n(&d.used->idx, __ATOMIC_ACQUIRE);
	while (d.used_seen != idx) {
		struct vused_elem e = d.used->ring[d.used_seen % QSIZE];
		d.used_seen++;
		u32 s = e.id / 3;
		if (e.id % 3 || s > SLOTS || !d.slots[s].busy) {
			bad("FERRY BAD disk used id=%u len=%u not in flight (used_idx=%u)\n", e.id,
			    e.len, d.used_seen);
			d.errors++;
			continue;
		}
		d.slots[s].busy = false;
		done(s, e.len);
		n++;
	}
	return n;
}

static void complete_normal(u32 s, u32 len)
{
	struct slot *sl = &d.slots[s];
	u8 st = d.status[s];
	(void)len;
	if (st != 0) {
		bad("FERRY BAD disk status=%u type=%u block=%lu\n", st, sl->type, sl->block);
		d.errors++;
		return;
	}
	if (sl->type == T_OUT)
		disk_gen[sl->block] = sl->gen;
	else if (sl->type == T_IN && !check_block((volatile u64 *)data_pa(s), sl->block, sl->gen))
		d.errors++;
}

static void wait_all(u32 n, void (*idle)(void *), void *arg)
{
	u32 got = 0;
	while (got < n) {
		got += reap(complete_normal);
		if (got < n) {
			cpu_relax();
			idle(arg);
		}
	}
}

static u64 rnd(void)
{
	return mix64(d.rng++);
}

/* Submits one batch: n requests on distinct blocks (all writes if fill). */
static void batch(u32 n, u64 first_block, void (*idle)(void *), void *arg)
{
	u32 k = 0;
	for (u32 s = 0; s < n; s++) {
		u64 b;
		if (first_block != ~0ULL) {
			b = first_block + s;
			if (b >= d.blocks)
				break;
		} else {
			bool dup;
			do {
				b = (u64)(((unsigned __int128)rnd() * d.blocks) >> 64);
				dup = false;
				for (u32 j = 0; j < s; j++)
					dup |= d.slots[j].block == b;
			} while (dup && d.blocks > n);
		}
		struct slot *sl = &d.slots[s];
		bool write = first_block != ~0ULL || (rnd() & 1);
		sl->block = b;
		sl->type = write ? T_OUT : T_IN;
		sl->gen = write ? disk_gen[b] + 1 : disk_gen[b];
		if (write)
			fill_block((volatile u64 *)data_pa(s), b, sl->gen);
		else
			memset((void *)data_pa(s), 0xee, BLOCK_BYTES);
		sl->busy = true;
		publish(chain(s, sl->type, b * SECTORS_PER_BLOCK, BLOCK_BYTES, !write));
		k++;
	}
	notify();
	wait_all(k, idle, arg);
	d.ops += k;
}

/* ------------------------------------------------------ malformed input */

static u32 bad_kind;

static void complete_bad(u32 s, u32 len)
{
	u8 st = d.status[s];
	/* IOERR (1) or UNSUPP (2); or nothing at all for a chain without a
	 * usable status byte. */
	if ((st == 1 || st == 2) || (st == 0xff && len == 0)) {
		d.rejected++;
		return;
	}
	bad("FERRY BAD disk malformed kind=%u accepted status=%u len=%u\n", bad_kind, st, len);
	d.errors++;
}

static void malformed(void (*idle)(void *), void *arg)
{
	u32 s = BAD_SLOT;
	u16 h = (u16)(3 * s);
	bad_kind = (u32)(d.malformed % 10);
	u16 head = chain(s, T_IN, 0, BLOCK_BYTES, true);
	switch (bad_kind) {
	case 0: /* header only */
		d.desc[h].flags = 0;
		break;
	case 1: /* write past the end of the disk */
		d.hdr[s].type = T_OUT;
		d.hdr[s].sector = d.sectors;
		d.desc[h + 1].flags = DESC_NEXT;
		break;
	case 2: /* buffer outside guest RAM */
		d.desc[h + 1].addr = 0xfff000000000ULL;
		break;
	case 3: /* read into a buffer the device may not write */
		d.desc[h + 1].flags = DESC_NEXT;
		break;
	case 4: /* read-only status byte */
		d.desc[h + 2].flags = 0;
		break;
	case 5: /* header too short */
		d.desc[h].len = 8;
		break;
	case 6: /* next index outside the table */
		d.desc[h + 1].next = 200;
		break;
	case 7: /* a loop */
		d.desc[h + 1].next = h;
		break;
	case 8: /* unknown request type */
		d.hdr[s].type = 0x77;
		break;
	default: /* not whole sectors */
		d.desc[h + 1].len = 100;
		break;
	}
	d.slots[s].busy = true;
	d.malformed++;
	publish(head);
	notify();
	while (!reap(complete_bad)) {
		cpu_relax();
		idle(arg);
	}
}

/* ----------------------------------------------------------- workload */

static void dump(void)
{
	for (u64 b = 0; b < d.blocks; b += 16) {
		char line[LINE_MAX];
		size_t n = 0;
		for (u64 i = b; i < MIN(b + 16, d.blocks); i++) {
			u32 g = disk_gen[i];
			char tmp[12];
			size_t k = 0;
			do {
				tmp[k++] = (char)('0' + g % 10);
				g /= 10;
			} while (g);
			line[n++] = ' ';
			while (k)
				line[n++] = tmp[--k];
		}
		line[n] = 0;
		kprintf("FERRY DISKGEN %lu%s\n", b, line);
	}
	kprintf("FERRY DISKEND %lu %lu %lu\n", d.ops, d.errors, d.blocks);
}

static void get_id(void (*idle)(void *), void *arg)
{
	struct slot *sl = &d.slots[0];
	sl->busy = true;
	sl->type = T_GET_ID;
	memset((void *)data_pa(0), 0, 32);
	publish(chain(0, T_GET_ID, 0, 20, true));
	notify();
	u32 got = 0;
	while (!got) {
		u16 idx = __atomic_load_n(&d.used->idx, __ATOMIC_ACQUIRE);
		if (idx != d.used_seen) {
			d.used_seen++;
			sl->busy = false;
			got = 1;
		} else {
			cpu_relax();
			idle(arg);
		}
	}
	if (d.status[0] != 0) {
		bad("FERRY BAD disk get_id status=%u\n", d.status[0]);
		d.errors++;
	}
	memcpy(d.serial, (void *)data_pa(0), 20);
	d.serial[20] = 0;
	for (u32 i = 0; i < 20 && d.serial[i]; i++)
		if (d.serial[i] < 0x21 || d.serial[i] > 0x7e)
			d.serial[i] = '?';
}

/* Ring 3, vCPU 0: the serial, then every block at generation 1. */
void disk_start(void (*idle)(void *), void *arg)
{
	if (!d.on)
		return;
	get_id(idle, arg);
	for (u64 b = 0; b < d.blocks; b += cfg.disk_batch)
		batch(cfg.disk_batch, b, idle, arg);
	d.ops = 0;
	kprintf("FERRY DISKINFO sectors=%lu blocks=%lu serial=%s\n", d.sectors, d.blocks,
		d.serial[0] ? d.serial : "-");
}

/* Ring 3, vCPU 0, once per round. */
void disk_step(void (*idle)(void *), void *arg)
{
	if (!d.on || d.finished)
		return;
	batch(cfg.disk_batch, ~0ULL, idle, arg);
	if (cfg.disk_bad && d.batches % 4 == 3)
		malformed(idle, arg);
	d.batches++;
	if (cfg.disk_ops && d.ops >= cfg.disk_ops) {
		d.finished = true;
		kprintf("FERRY DISK %lu %lu %lu %lu\n", d.ops, d.errors, d.malformed, d.rejected);
		dump();
	}
}

void disk_report(void)
{
	if (d.on && !d.finished)
		kprintf("FERRY DISK %lu %lu %lu %lu\n", d.ops, d.errors, d.malformed, d.rejected);
}
