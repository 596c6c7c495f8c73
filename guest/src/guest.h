/*
 * Ferry workload guest: shared declarations and tiny hardware helpers.
 *
 * Freestanding x86-64 C (gcc -ffreestanding -nostdlib -mgeneral-regs-only):
 * no libc, no floating point, no SSE in compiled code.  The only code that
 * touches vector registers is the hand-written register check in boot.S.
 */
#ifndef FERRY_GUEST_H
#define FERRY_GUEST_H

#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef uint8_t u8;
typedef uint16_t u16;
typedef uint32_t u32;
typedef uint64_t u64;

/* Must match MAX_CPUS / STACK_SIZE in boot.S. */
#define MAX_CPUS 8
#define PAGE_SIZE 4096ULL
#define WORDS_PER_PAGE 512

/* Interrupt vectors. */
#define VEC_TIMER 0x30
#define VEC_SPURIOUS 0xff

#define ALIGN_UP(x, a) (((x) + (a) - 1) & ~((u64)(a) - 1))
#define ALIGN_DOWN(x, a) ((x) & ~((u64)(a) - 1))
#define MIN(a, b) ((a) < (b) ? (a) : (b))
#define MAX(a, b) ((a) > (b) ? (a) : (b))

#define barrier() __asm__ volatile("" ::: "memory")

/* ---------------------------------------------------------------- CPU ops */

static inline void outb(u16 port, u8 v)
{
	__asm__ volatile("outb %0, %1" ::"a"(v), "Nd"(port));
}

static inline u8 inb(u16 port)
{
	u8 v;
	__asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
	return v;
}

static inline u64 rdtsc(void)
{
	u32 lo, hi;
	__asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
	return ((u64)hi << 32) | lo;
}

static inline u64 rdmsr(u32 msr)
{
	u32 lo, hi;
	__asm__ volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(msr));
	return ((u64)hi << 32) | lo;
}

static inline void wrmsr(u32 msr, u64 v)
{
	__asm__ volatile("wrmsr" ::"c"(msr), "a"((u32)v), "d"((u32)(v >> 32))
			 : "memory");
}

struct cpuid_regs {
	u32 eax, ebx, ecx, edx;
};

static inline struct cpuid_regs cpuid(u32 leaf, u32 subleaf)
{
	struct cpuid_regs r;
	__asm__ volatile("cpuid"
			 : "=a"(r.eax), "=b"(r.ebx), "=c"(r.ecx), "=d"(r.edx)
			 : "a"(leaf), "c"(subleaf));
	return r;
}

static inline void cpu_relax(void)
{
	__asm__ volatile("pause" ::: "memory");
}

static inline u64 read_cr0(void)
{
	u64 v;
	__asm__ volatile("mov %%cr0, %0" : "=r"(v));
	return v;
}

static inline void write_cr0(u64 v)
{
	__asm__ volatile("mov %0, %%cr0" ::"r"(v) : "memory");
}

static inline u64 read_cr2(void)
{
	u64 v;
	__asm__ volatile("mov %%cr2, %0" : "=r"(v));
	return v;
}

static inline void write_cr3(u64 v)
{
	__asm__ volatile("mov %0, %%cr3" ::"r"(v) : "memory");
}

static inline u64 read_cr4(void)
{
	u64 v;
	__asm__ volatile("mov %%cr4, %0" : "=r"(v));
	return v;
}

static inline void write_cr4(u64 v)
{
	__asm__ volatile("mov %0, %%cr4" ::"r"(v) : "memory");
}

/* Current privilege level from CS (readable in any ring, never traps). */
static inline bool in_user_mode(void)
{
	u16 cs;
	__asm__ volatile("mov %%cs, %0" : "=r"(cs));
	return (cs & 3) == 3;
}

/* Plain 32-bit MMIO accesses: a single `mov`, which every KVM flavour can
 * emulate (PVM in particular only handles simple instructions). */
static inline u32 mmio_read32(u64 addr)
{
	u32 v;
	__asm__ volatile("movl (%1), %0" : "=r"(v) : "r"(addr) : "memory");
	return v;
}

static inline void mmio_write32(u64 addr, u32 v)
{
	__asm__ volatile("movl %0, (%1)" ::"r"(v), "r"(addr) : "memory");
}

/* splitmix64 finaliser: the hash behind every data pattern. */
static inline u64 mix64(u64 x)
{
	x += 0x9e3779b97f4a7c15ULL;
	x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
	x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
	return x ^ (x >> 31);
}

/* -------------------------------------------------------------- per-CPU */

#define LINE_MAX 192
#define OUTQ_LINES 16

struct outq_line {
	u16 len;
	bool is_bad;
	char text[LINE_MAX];
};

/* Single-producer (ring 3) single-consumer (timer interrupt, same CPU)
 * queue of output lines. */
struct outq {
	volatile u32 head; /* written by ring 3 */
	volatile u32 tail; /* written by the interrupt handler */
	struct outq_line lines[OUTQ_LINES];
};

struct percpu {
	u32 idx;                 /* vCPU index == initial APIC ID */
	volatile u64 timer_irqs; /* LAPIC timer interrupts taken */
	volatile u32 msr_check;  /* ring 3 asks ring 0 to check the MSRs */
	volatile u32 inject;     /* selftest: INJECT_* for ring 0 to do */
	u32 apic_timer_count;    /* periodic initial count (divide by 16) */
	struct outq outq;
};

extern struct percpu percpu[MAX_CPUS];
extern char boot_stacks[]; /* boot.S: per CPU a user and a kernel stack */
#define STACK_SHIFT 15
#define USER_STACK_SIZE (1ULL << (STACK_SHIFT - 1))

/* Current CPU index, from which per-CPU stack region we are on (the user
 * stack in ring 3, the kernel stack in ring 0: interrupts switch to it via
 * TSS.rsp0). */
static inline u32 this_cpu(void)
{
	u64 sp;
	__asm__ volatile("mov %%rsp, %0" : "=r"(sp));
	return (u32)((sp - (u64)boot_stacks) >> STACK_SHIFT);
}

static inline u64 user_stack_top(u32 idx)
{
	return (u64)boot_stacks + ((u64)idx << STACK_SHIFT) + USER_STACK_SIZE;
}

/* Global configuration, written by the BSP before the APs are released. */
struct config {
	u32 cpus;
	u64 ws_bytes;     /* requested working set */
	u32 pattern;      /* PATTERN_* */
	u32 write_pct;
	u32 hot_pct;      /* hotcold: share of accesses to the hot tenth */
	bool hot_last;    /* hotcold: the hot tenth is the last, not the first */
	u64 rate;         /* dirty pages/s over all vCPUs, 0 = unlimited */
	u64 report_ms;
	u64 tsc_khz;      /* 0 until known */
	u64 seed;
	int avx;          /* -1 = use it if CPUID has it, 0 = never */
	int x2apic;       /* -1 = use it if CPUID has it, 0 = use xAPIC MMIO */
	u32 inject;       /* INJECT_* */
	bool tsc_khz_given;
	bool stream;      /* stream=1: print the STREAM byte stream, no workload */
	bool disk;        /* disk=1: vCPU 0 runs the disk workload (disk.c) */
	bool disk_bad;    /* disk_bad=1: also submit malformed chains */
	u32 disk_batch;   /* requests per batch, 1..8 */
	u64 disk_blocks;  /* blocks (4 KiB) used, at most 4096 */
	u64 disk_ops;     /* stop the disk workload after this many, 0 = never */
	bool net;         /* net=1: vCPU 0 runs the UDP echo workload (net.c) */
	u32 net_ip;       /* the guest's IPv4 address (host order) */
	u32 net_peer;     /* the echo peer's */
	u32 net_port;     /* UDP port, both ends */
	u64 net_ms;       /* a datagram every net_ms */
};

enum { PATTERN_SEQ, PATTERN_RANDOM, PATTERN_HOTCOLD };

/* Self-test faults (cmdline inject=...), done once by vCPU 0. */
enum { INJECT_NONE, INJECT_PAGE, INJECT_REG, INJECT_MSR, INJECT_TIMER };

/* Enter ring 0 (boot.S: a `ud2` that trap_handler skips): drains this
 * CPU's output queue and performs the work flagged in percpu. */
void ferry_syscall(void);
static inline void syscall0(void)
{
	barrier();
	ferry_syscall();
	barrier();
}

extern struct config cfg;

/* CPU features, detected by the BSP. */
extern bool have_x2apic, have_avx, have_rdtscp;

/* ------------------------------------------------------------ console.c */

void uart_init(void);
/* stream=1: check every byte's THR-empty interrupt; misses are counted. */
void uart_check_thre(void);
extern volatile u64 thre_missed;
/* Print this CPU's queued ring-3 lines (timer interrupt). */
void console_drain(u32 idx);
void kprintf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* kprintf/bad work in both rings: ring 0 prints directly, ring 3 queues.
 * bad() is like kprintf, but rate-limited (shared budget for BAD lines). */
void bad(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* Unconditional, lock-breaking output for fatal paths. */
void kprintf_fatal(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* --------------------------------------------------------------- util.c */

void *memset(void *d, int c, size_t n);
void *memcpy(void *d, const void *s, size_t n);
void *memmove(void *d, const void *s, size_t n);
int memcmp(const void *a, const void *b, size_t n);
size_t strlen(const char *s);
bool str_eq_n(const char *a, size_t alen, const char *b);
/* Parse a decimal number; returns false on empty/invalid/overflow. */
bool parse_u64(const char *s, size_t len, u64 *out);

/* ---------------------------------------------------------------- cpu.c */

void cpu_detect_features(void);
void idt_build(void);             /* BSP, before the APs are released */
void cpu_init(u32 idx);           /* TSS/IDT/SSE/AVX on this CPU */
u64 tsc_calibrate_pit(void);      /* returns kHz, 0 on failure */
void pic_disable(void);
void apic_timer_start(u32 idx);   /* calibrate + start periodic timer */
void msr_setup(u32 idx);
void msr_check(u32 idx);          /* ring 0 */
__attribute__((noreturn)) void halt_forever(void);

/* ----------------------------------------------------------------- mm.c */

#define MAX_SEGS 16

/* A run of physically contiguous working-set pages. */
struct ws_seg {
	u64 pa;         /* physical address of the first page */
	u64 first_page; /* working-set page number of the first page */
	u64 pages;
};

struct memory {
	u64 ram_bytes;          /* total type-1 RAM in the memmap */
	u64 pml4_pa;            /* root of the full identity map */
	u32 *gen;               /* generation array, one u32 per ws page */
	u64 ws_pages;           /* total working-set pages (multiple of cpus) */
	u32 nsegs;
	struct ws_seg segs[MAX_SEGS];
	u64 dma_pa;             /* DMA_PAGES pages for the virtio driver */
};

/* The disk driver's first 16 pages, then the network driver's. */
#define DMA_PAGES 40
#define NET_DMA_OFFSET (16 * PAGE_SIZE)

extern struct memory mem;

/* Copy what we need out of hvm_start_info (cmdline, memmap). */
void start_info_read(u64 start_info_pa, char *cmdline, size_t cmdline_size);
/* Build page tables, allocate the generation array and working set. */
void mm_setup(void);
/* Physical address of working-set page `page`. */
static inline u64 *ws_page_ptr(u64 page)
{
	for (u32 i = 0; i < mem.nsegs; i++) {
		const struct ws_seg *s = &mem.segs[i];
		if (page - s->first_page < s->pages)
			return (u64 *)(s->pa + (page - s->first_page) * PAGE_SIZE);
	}
	return NULL;
}

/* --------------------------------------------------------------- disk.c */

/* cmdline `virtio_mmio.device=<size>@<base>:<irq>`; false if malformed. */
bool virtio_mmio_option(const char *v, size_t len);
void disk_init(u64 dma_pa);                           /* ring 0, BSP */
void disk_start(void (*idle)(void *), void *arg);     /* ring 3, vCPU 0 */
void disk_step(void (*idle)(void *), void *arg);      /* ring 3, vCPU 0 */
void disk_report(void);                               /* ring 3, vCPU 0 */
/* The devices named on the command line. */
u32 virtio_count(void);
u64 virtio_base(u32 i);

/* ---------------------------------------------------------------- net.c */

void net_init(u64 dma_pa); /* ring 0, BSP */
void net_step(void);       /* ring 3, vCPU 0, every round */
void net_report(void);     /* ring 3, vCPU 0 */

/* --------------------------------------------------------------- boot.S */

/* Values loaded into the checked registers by regcheck(). */
struct regvals {
	u64 gpr[5];       /* rbx, r12, r13, r14, r15 */
	u64 xmm[8][2];    /* xmm8..xmm15 */
	u64 ymmhi[8][2];  /* upper 128 bits of ymm8..ymm15 */
};

/*
 * Load `v` into rbx, r12-r15, xmm8-15 (and ymm8-15 upper halves if `avx`),
 * spin with `pause` for `spin_cycles` TSC cycles, then compare.  Returns a
 * bit mask of mismatching registers: bit 0 rbx, bits 1-4 r12-r15,
 * bits 5-12 xmm8-15, bits 13-20 ymm8h-ymm15h.  `inject` (self-test) flips
 * r13 and xmm12 inside the window.
 */
u32 regcheck(const struct regvals *v, u64 spin_cycles, u64 avx, u64 inject);

/* iretq to ring 3 at fn(arg) on user_rsp with interrupts enabled. */
__attribute__((noreturn)) void enter_user(void (*fn)(u64), u64 user_rsp, u64 arg);

extern volatile u32 boot_release; /* BSP sets to 1 once page tables are ready */
extern char _image_start[], _end[];

/* ---------------------------------------------------------------- main.c */

void guest_main(u32 idx, u64 start_info_pa);
/* What isr_common (boot.S) leaves on the stack. */
struct trap_frame {
	u64 r11, r10, r9, r8, rdi, rsi, rdx, rcx, rax;
	u64 vec, err;
	u64 rip, cs, rflags, rsp, ss; /* pushed by the CPU */
};

void trap_handler(struct trap_frame *f);

#endif
