/*
 * Serial console on COM1 (0x3f8).
 *
 * Only ring 0 touches the UART, always with interrupts off and under one
 * spinlock, a whole line at a time, so lines from different vCPUs never
 * interleave.  Ring 3 (the workload) formats a line into its CPU's output
 * queue; the timer interrupt on that CPU drains the queue.  The BAD-line
 * rate limit is applied when lines reach the UART.
 *
 * A tiny printf: %d %u %x %s %c with optional `l`/`ll`.
 */
#include "guest.h"

#define COM1 0x3f8
#define LSR_THRE 0x20

/* Owner CPU + 1, or 0 when free.  Only taken in ring 0 with IF=0. */
static volatile u32 console_lock;

/* BAD-line budget: at most BAD_BURST lines per second, shared by all CPUs
 * (protected by console_lock). */
#define BAD_BURST 10
static u64 bad_window_start;
static u32 bad_in_window;
static u64 bad_suppressed;

void uart_init(void)
{
	outb(COM1 + 1, 0x00); /* no interrupts */
	outb(COM1 + 3, 0x80); /* DLAB */
	outb(COM1 + 0, 0x01); /* 115200 baud */
	outb(COM1 + 1, 0x00);
	outb(COM1 + 3, 0x03); /* 8N1 */
	outb(COM1 + 2, 0xc7); /* FIFO on, cleared */
	outb(COM1 + 4, 0x03); /* DTR | RTS */
}

/* stream=1: the THR-empty interrupt of every byte is checked (its line
 * stays masked in the PIC and IOAPIC, so it is only ever polled). */
static bool check_thre;
volatile u64 thre_missed;

void uart_check_thre(void)
{
	outb(COM1 + 1, 0x02); /* IER: THR empty */
	(void)inb(COM1 + 2);  /* take the one enabling it raised */
	check_thre = true;
}

static void uart_putc(char c)
{
	/* Bounded wait: a missing or stuck UART must not hang the guest.
	 * (With check_thre, the THR-empty interrupt of the previous byte
	 * already said the UART is ready.) */
	for (u32 i = 0; !check_thre && i < 100000; i++) {
		if (inb(COM1 + 5) & LSR_THRE)
			break;
		cpu_relax();
	}
	outb(COM1, (u8)c);
	/* The UART sends at once, so the byte's THR-empty interrupt must be
	 * pending now; reading IIR takes it.  A read that came back twice
	 * (the VMM saved the vCPU between the read and its completion, so the
	 * restored vCPU ran the `in` again) finds none. */
	if (check_thre && (inb(COM1 + 2) & 0x0f) != 0x02)
		__atomic_fetch_add(&thre_missed, 1, __ATOMIC_RELAXED);
}

/* ---------------------------------------------------------- formatting */

struct buf {
	char *p;
	size_t len, cap;
};

static void put(struct buf *b, char c)
{
	if (b->len + 1 < b->cap)
		b->p[b->len++] = c;
}

/* `width` is a zero-padded minimum number of digits (`%02x`), 0 for none. */
static void put_num(struct buf *b, u64 v, unsigned base, bool neg, int width)
{
	char tmp[24];
	int n = 0;
	if (neg)
		put(b, '-');
	do {
		tmp[n++] = "0123456789abcdef"[v % base];
		v /= base;
	} while (v);
	for (int pad = width - n; pad > 0; pad--)
		put(b, '0');
	while (n)
		put(b, tmp[--n]);
}

static size_t vformat(char *out, size_t cap, const char *fmt, va_list ap)
{
	struct buf b = { out, 0, cap };
	for (; *fmt; fmt++) {
		if (*fmt != '%') {
			put(&b, *fmt);
			continue;
		}
		fmt++;
		int width = 0;
		if (*fmt == '0') {
			fmt++;
			while (*fmt >= '0' && *fmt <= '9' && width < 20)
				width = width * 10 + (*fmt++ - '0');
		}
		int longs = 0;
		while (*fmt == 'l') {
			longs++;
			fmt++;
		}
		switch (*fmt) {
		case 'd': {
			long long v = longs ? va_arg(ap, long long) : va_arg(ap, int);
			put_num(&b, v < 0 ? -(u64)v : (u64)v, 10, v < 0, width);
			break;
		}
		case 'u':
		case 'x': {
			u64 v = longs ? va_arg(ap, unsigned long long) : va_arg(ap, unsigned);
			put_num(&b, v, *fmt == 'u' ? 10 : 16, false, width);
			break;
		}
		case 's': {
			const char *s = va_arg(ap, const char *);
			while (s && *s)
				put(&b, *s++);
			break;
		}
		case 'c':
			put(&b, (char)va_arg(ap, int));
			break;
		case '%':
			put(&b, '%');
			break;
		default: /* unknown conversion: print it verbatim */
			put(&b, '%');
			if (!*fmt)
				goto done;
			put(&b, *fmt);
		}
	}
done:
	out[b.len] = 0;
	return b.len;
}

static size_t format(char *out, size_t cap, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));

static size_t format(char *out, size_t cap, const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	size_t n = vformat(out, cap, fmt, ap);
	va_end(ap);
	return n;
}

/* ------------------------------------------------------ ring 0 output */

static void lock_console(bool force)
{
	u32 me = this_cpu() + 1;
	for (u64 spins = 0;; spins++) {
		u32 expected = 0;
		if (__atomic_compare_exchange_n(&console_lock, &expected, me, false,
						__ATOMIC_ACQUIRE, __ATOMIC_RELAXED))
			return;
		/* Fatal paths (exceptions) break a lock held by this very CPU
		 * (the fault hit while printing) or a stuck one. */
		if (force && (expected == me || spins > 10000000)) {
			__atomic_store_n(&console_lock, me, __ATOMIC_RELAXED);
			return;
		}
		cpu_relax();
	}
}

static void unlock_console(void)
{
	__atomic_store_n(&console_lock, 0, __ATOMIC_RELEASE);
}

static void emit(const char *line, size_t len)
{
	for (size_t i = 0; i < len; i++)
		uart_putc(line[i]);
}

/* Emit one line, applying the BAD budget.  Caller holds console_lock. */
static void emit_line(const char *line, size_t len, bool is_bad)
{
	if (is_bad) {
		/* One-second windows by TSC; before calibration, assume 1 GHz. */
		u64 now = rdtsc();
		u64 second = (cfg.tsc_khz ? cfg.tsc_khz : 1000000) * 1000;
		if (now - bad_window_start >= second) {
			if (bad_suppressed) {
				char note[64];
				size_t n = format(note, sizeof(note),
						  "FERRY BAD suppressed count=%lu\n",
						  bad_suppressed);
				emit(note, n);
				bad_suppressed = 0;
			}
			bad_window_start = now;
			bad_in_window = 0;
		}
		if (bad_in_window >= BAD_BURST) {
			bad_suppressed++;
			return;
		}
		bad_in_window++;
	}
	emit(line, len);
}

/* ------------------------------------------------------ ring 3 output */

static void enqueue(const char *line, size_t len, bool is_bad)
{
	struct outq *q = &percpu[this_cpu()].outq;
	u32 head = q->head;
	/* Full: wait for this CPU's timer interrupt to drain it. */
	while (head - __atomic_load_n(&q->tail, __ATOMIC_ACQUIRE) >= OUTQ_LINES)
		cpu_relax();
	struct outq_line *l = &q->lines[head % OUTQ_LINES];
	memcpy(l->text, line, len);
	l->len = (u16)len;
	l->is_bad = is_bad;
	__atomic_store_n(&q->head, head + 1, __ATOMIC_RELEASE);
}

void console_drain(u32 idx)
{
	struct outq *q = &percpu[idx].outq;
	u32 head = __atomic_load_n(&q->head, __ATOMIC_ACQUIRE);
	if (q->tail == head)
		return;
	lock_console(false);
	for (u32 t = q->tail; t != head; t++) {
		struct outq_line *l = &q->lines[t % OUTQ_LINES];
		emit_line(l->text, l->len, l->is_bad);
	}
	unlock_console();
	__atomic_store_n(&q->tail, head, __ATOMIC_RELEASE);
}

/* ------------------------------------------------------------ printing */

static void vprint(bool force, bool is_bad, const char *fmt, va_list ap)
{
	char line[LINE_MAX];
	size_t len = vformat(line, sizeof(line), fmt, ap);
	if (in_user_mode()) {
		enqueue(line, len, is_bad);
		syscall0(); /* print it now; the timer tick is the backup */
		return;
	}
	lock_console(force);
	emit_line(line, len, is_bad && !force);
	unlock_console();
}

void kprintf(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	vprint(false, false, fmt, ap);
	va_end(ap);
}

void kprintf_fatal(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	vprint(true, true, fmt, ap);
	va_end(ap);
}

void bad(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	vprint(false, true, fmt, ap);
	va_end(ap);
}
