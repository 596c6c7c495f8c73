/*
 * Per-CPU setup: feature detection, GDT/TSS, IDT and trap handling,
 * SSE/AVX enabling, the LAPIC timer (x2APIC or xAPIC), TSC calibration
 * against the PIT, and the MSR values we plant and check.
 */
#include "guest.h"

bool have_x2apic, have_avx, have_rdtscp;

/* ---------------------------------------------------------- features */

void cpu_detect_features(void)
{
	struct cpuid_regs l1 = cpuid(1, 0);
	have_x2apic = l1.ecx & (1u << 21);
	bool xsave = l1.ecx & (1u << 26);
	bool avx = l1.ecx & (1u << 28);
	if (xsave && avx) {
		/* XCR0 must be able to hold SSE (bit 1) and AVX (bit 2). */
		struct cpuid_regs d = cpuid(0xd, 0);
		have_avx = (d.eax & 6) == 6;
	}
	if (cpuid(0x80000000, 0).eax >= 0x80000001)
		have_rdtscp = cpuid(0x80000001, 0).edx & (1u << 27);
}

/* ----------------------------------------------------------- GDT/TSS */

struct tss {
	u32 reserved0;
	u64 rsp[3];
	u64 reserved1;
	u64 ist[7];
	u64 reserved2;
	u16 reserved3;
	u16 iomap_base;
} __attribute__((packed));

static struct tss tss[MAX_CPUS];
/* boot.S: null, code64, data, user data, user code64, 2 slots per CPU */
extern u64 gdt[];

static void tss_load(u32 idx)
{
	struct tss *t = &tss[idx];
	u64 base = (u64)t, limit = sizeof(*t) - 1;
	/* Interrupts from ring 3 switch to the top of this CPU's kernel stack
	 * (the setup code that ran on it never returns). */
	t->rsp[0] = (u64)boot_stacks + ((u64)(idx + 1) << STACK_SHIFT);
	t->iomap_base = sizeof(*t); /* no I/O bitmap: ring 3 has no port access */
	u32 slot = 5 + 2 * idx;
	gdt[slot] = (limit & 0xffff) | ((base & 0xffffff) << 16) |
		    (0x89ULL << 40) /* present, available 64-bit TSS */ |
		    (((limit >> 16) & 0xf) << 48) | (((base >> 24) & 0xff) << 56);
	gdt[slot + 1] = base >> 32;
	u16 sel = (u16)(slot * 8);
	__asm__ volatile("ltr %0" ::"r"(sel) : "memory");
}

/* ---------------------------------------------------------------- IDT */

struct idt_entry {
	u16 off_lo;
	u16 sel;
	u8 ist;
	u8 type;
	u16 off_mid;
	u32 off_hi;
	u32 zero;
} __attribute__((packed));

static struct idt_entry idt[256] __attribute__((aligned(16)));
extern char isr_stubs[]; /* boot.S: 16 bytes per vector */

void idt_build(void)
{
	for (u32 v = 0; v < 256; v++) {
		u64 h = (u64)isr_stubs + 16 * v;
		idt[v] = (struct idt_entry){
			.off_lo = (u16)h,
			.sel = 0x08,
			.ist = 0,
			.type = 0x8e, /* present, DPL 0, 64-bit interrupt gate */
			.off_mid = (u16)(h >> 16),
			.off_hi = (u32)(h >> 32),
		};
	}
}

static void idt_load(void)
{
	struct {
		u16 limit;
		u64 base;
	} __attribute__((packed)) desc = { sizeof(idt) - 1, (u64)idt };
	__asm__ volatile("lidt %0" ::"m"(desc) : "memory");
}

/* ---------------------------------------------------------- SSE/AVX */

static void fpu_enable(void)
{
	u64 cr0 = read_cr0();
	cr0 &= ~((1ULL << 2) | (1ULL << 3)); /* EM, TS */
	cr0 |= 1ULL << 1;                    /* MP */
	write_cr0(cr0);
	u64 cr4 = read_cr4() | (1ULL << 9) | (1ULL << 10); /* OSFXSR, OSXMMEXCPT */
	if (have_avx)
		cr4 |= 1ULL << 18; /* OSXSAVE */
	write_cr4(cr4);
	if (have_avx) /* XCR0 = x87 | SSE | AVX */
		__asm__ volatile("xsetbv" ::"c"(0), "a"(7), "d"(0));
}

void cpu_init(u32 idx)
{
	tss_load(idx);
	idt_load();
	fpu_enable();
}

__attribute__((noreturn)) void halt_forever(void)
{
	for (;;)
		__asm__ volatile("cli; hlt" ::: "memory");
}

/* --------------------------------------------------------------- APIC */

#define MSR_APIC_BASE 0x1b
#define APIC_BASE_EN (1ULL << 11)
#define APIC_BASE_EXTD (1ULL << 10)

/* xAPIC register offsets; the x2APIC MSR is 0x800 + offset / 16. */
#define APIC_TPR 0x080
#define APIC_EOI 0x0b0
#define APIC_SVR 0x0f0
#define APIC_LVT_TIMER 0x320
#define APIC_LVT_LINT0 0x350
#define APIC_LVT_LINT1 0x360
#define APIC_TIMER_INIT 0x380
#define APIC_TIMER_CUR 0x390
#define APIC_TIMER_DIV 0x3e0

#define LVT_MASKED (1u << 16)
#define LVT_PERIODIC (1u << 17)

static u64 xapic_base = 0xfee00000;

static void apic_write(u32 reg, u32 v)
{
	if (have_x2apic)
		wrmsr(0x800 + (reg >> 4), v);
	else
		mmio_write32(xapic_base + reg, v);
}

static u32 apic_read(u32 reg)
{
	if (have_x2apic)
		return (u32)rdmsr(0x800 + (reg >> 4));
	return mmio_read32(xapic_base + reg);
}

static void apic_eoi(void)
{
	apic_write(APIC_EOI, 0);
}

static void apic_enable(void)
{
	u64 base = rdmsr(MSR_APIC_BASE);
	if (!(base & APIC_BASE_EN)) {
		base |= APIC_BASE_EN;
		wrmsr(MSR_APIC_BASE, base);
	}
	if (have_x2apic) {
		base |= APIC_BASE_EXTD; /* xAPIC -> x2APIC is the legal order */
		wrmsr(MSR_APIC_BASE, base);
	} else {
		xapic_base = base & 0xfffff000ULL; /* mm.c maps 0xfec00000-4G */
	}
	apic_write(APIC_TPR, 0);
	apic_write(APIC_SVR, 0x100 | VEC_SPURIOUS);
	apic_write(APIC_LVT_LINT0, LVT_MASKED);
	apic_write(APIC_LVT_LINT1, LVT_MASKED);
}

static void tsc_wait(u64 cycles)
{
	u64 t0 = rdtsc();
	while (rdtsc() - t0 < cycles)
		cpu_relax();
}

void apic_timer_start(u32 idx)
{
	apic_enable();
	apic_write(APIC_TIMER_DIV, 0x3); /* divide by 16 */

	/* Calibrate: count down from ~0 for 10 ms of TSC time (masked). */
	apic_write(APIC_LVT_TIMER, LVT_MASKED | VEC_TIMER);
	apic_write(APIC_TIMER_INIT, 0xffffffffu);
	tsc_wait(cfg.tsc_khz * 10);
	u32 elapsed = 0xffffffffu - apic_read(APIC_TIMER_CUR);
	apic_write(APIC_TIMER_INIT, 0);
	if (elapsed == 0) {
		bad("FERRY BAD timer vcpu=%u calibration\n", idx);
		elapsed = 625000; /* KVM's 1 GHz APIC bus / 16 / 100 Hz */
	}
	percpu[idx].apic_timer_count = elapsed;

	/* Periodic, 10 ms per interrupt = 100 Hz. */
	apic_write(APIC_LVT_TIMER, LVT_PERIODIC | VEC_TIMER);
	apic_write(APIC_TIMER_INIT, elapsed);
}

/* -------------------------------------------------------- PIC and PIT */

/* Remap the 8259s away from the exception vectors and mask every line. */
void pic_disable(void)
{
	outb(0x20, 0x11);
	outb(0xa0, 0x11);
	outb(0x21, 0x20);
	outb(0xa1, 0x28);
	outb(0x21, 0x04);
	outb(0xa1, 0x02);
	outb(0x21, 0x01);
	outb(0xa1, 0x01);
	outb(0x21, 0xff);
	outb(0xa1, 0xff);
}

static u16 pit_read_ch0(void)
{
	outb(0x43, 0x00); /* latch channel 0 */
	u8 lo = inb(0x40);
	u8 hi = inb(0x40);
	return (u16)(lo | (hi << 8));
}

/*
 * TSC frequency in kHz, measured against PIT channel 0 over ~50 ms.
 * Channel 0 free-runs in mode 2 with period 65536 and we poll its latched
 * count, so this needs neither the speaker port 0x61 (absent on microvm)
 * nor fast polling.  Call with the PIC masked.  Returns 0 without a PIT.
 */
u64 tsc_calibrate_pit(void)
{
	const u64 pit_hz = 1193182, target = pit_hz / 20; /* 50 ms */
	outb(0x43, 0x34); /* channel 0, lo/hi, mode 2, binary */
	outb(0x40, 0);
	outb(0x40, 0);    /* count 65536 */
	u16 prev = pit_read_ch0();
	u64 t0 = rdtsc(), ticks = 0;
	for (u32 stuck = 0; ticks < target;) {
		u16 cur = pit_read_ch0();
		u16 delta = (u16)(prev - cur); /* counts down, wraps at 2^16 */
		if (!delta && ++stuck > 100000)
			return 0;
		ticks += delta;
		prev = cur;
	}
	return (rdtsc() - t0) * pit_hz / (ticks * 1000);
}

/* --------------------------------------------------------------- MSRs */

#define MSR_STAR 0xc0000081
#define MSR_LSTAR 0xc0000082
#define MSR_KERNEL_GS_BASE 0xc0000102
#define MSR_TSC_AUX 0xc0000103

struct msr_val {
	u32 msr;
	u64 val;
};

/* Per-vCPU values; the addresses are canonical, TSC_AUX fits 32 bits. */
static u32 msr_values(u32 idx, struct msr_val *out)
{
	u32 n = 0;
	out[n++] = (struct msr_val){ MSR_KERNEL_GS_BASE,
				     0xffffc0de00000000ULL | ((u64)idx << 12) | 0x5a0 };
	out[n++] = (struct msr_val){ MSR_STAR, 0x0023001000000000ULL | (0xf00d0000ULL + idx) };
	out[n++] = (struct msr_val){ MSR_LSTAR, 0xffffffff81000000ULL + ((u64)idx << 8) + 0x10 };
	if (have_rdtscp)
		out[n++] = (struct msr_val){ MSR_TSC_AUX, 0xfe00 + idx };
	return n;
}

void msr_setup(u32 idx)
{
	struct msr_val v[4];
	u32 n = msr_values(idx, v);
	for (u32 i = 0; i < n; i++)
		wrmsr(v[i].msr, v[i].val);
}

void msr_check(u32 idx)
{
	struct msr_val v[4];
	u32 n = msr_values(idx, v);
	for (u32 i = 0; i < n; i++) {
		u64 got = rdmsr(v[i].msr);
		if (got != v[i].val)
			bad("FERRY BAD msr 0x%x want=0x%lx got=0x%lx vcpu=%u\n", v[i].msr,
			    v[i].val, got, idx);
	}
}

/* -------------------------------------------------------------- traps */

/* Self-test faults that need ring 0. */
static void do_inject(u32 idx, u32 what)
{
	switch (what) {
	case INJECT_MSR:
		wrmsr(MSR_KERNEL_GS_BASE, 0xffff800000000bad);
		break;
	case INJECT_TIMER:
		apic_write(APIC_LVT_TIMER, LVT_MASKED | VEC_TIMER);
		break;
	default:
		break;
	}
}

/* Output, requested checks and injections: on every tick and syscall. */
static void service(u32 idx)
{
	struct percpu *pc = &percpu[idx];
	if (pc->inject) {
		do_inject(idx, pc->inject);
		pc->inject = 0;
	}
	console_drain(idx);
	if (pc->msr_check) {
		pc->msr_check = 0;
		msr_check(idx);
	}
}

void trap_handler(struct trap_frame *f)
{
	u32 idx = this_cpu();
	u64 vec = f->vec;
	if (vec == VEC_TIMER) {
		percpu[idx].timer_irqs++;
		service(idx);
		apic_eoi();
		return;
	}
	if (vec == 6 && f->rip == (u64)ferry_syscall && (f->cs & 3) == 3) {
		f->rip += 2; /* skip the ud2 */
		service(idx);
		return;
	}
	if (vec == VEC_SPURIOUS)
		return; /* no EOI for spurious interrupts */
	if (vec < 32) {
		console_drain(idx); /* what ring 3 said last may explain it */
		kprintf_fatal("FERRY BAD exception vec=%lu rip=0x%lx err=0x%lx cr2=0x%lx vcpu=%u\n",
			      vec, f->rip, f->err, read_cr2(), idx);
		halt_forever();
	}
	bad("FERRY BAD irq vec=%lu vcpu=%u\n", vec, idx);
	apic_eoi();
}
