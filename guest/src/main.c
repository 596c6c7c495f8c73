/*
 * Ferry workload guest: boot sequencing, command line, and the per-vCPU
 * workload loop with its checks.  See guest/src/lib.rs for the protocol.
 */
#include "guest.h"

struct config cfg = {
	.cpus = 1,
	.ws_bytes = 64ULL << 20,
	.pattern = PATTERN_RANDOM,
	.write_pct = 50,
	.hot_pct = 90,
	.rate = 0,
	.report_ms = 100,
	.tsc_khz = 0,
	.seed = 0,
	.avx = -1,
	.x2apic = -1,
	.disk_batch = 4,
	.disk_blocks = 256,
	.net_port = 7777,
	.net_ms = 10,
};

struct percpu percpu[MAX_CPUS];

static char cmdline[1024];
static const char *const pattern_names[] = { "seq", "random", "hotcold" };
static const char *const inject_names[] = { "none", "page", "reg", "msr", "timer" };

/* Page operations per round; every round also runs the register check. */
#define OPS_PER_ROUND 8
/* Register check window, in microseconds. */
#define REGCHECK_US 2

/* -------------------------------------------------------- command line */

static bool parse_size(const char *v, size_t len, u64 *out)
{
	u64 mult = 1;
	if (len > 1) {
		switch (v[len - 1]) {
		case 'K': case 'k': mult = 1ULL << 10; break;
		case 'M': case 'm': mult = 1ULL << 20; break;
		case 'G': case 'g': mult = 1ULL << 30; break;
		default: break;
		}
		if (mult != 1)
			len--;
	}
	u64 n;
	if (!parse_u64(v, len, &n) || n == 0 || n > (~0ULL / mult))
		return false;
	*out = n * mult;
	return true;
}

/* Sets *out to the index of v among the n names; false if it is none. */
static bool parse_name(const char *v, size_t vlen, const char *const *names, u32 n, u32 *out)
{
	bool ok = false;
	for (u32 i = 0; i < n; i++) {
		if (str_eq_n(v, vlen, names[i])) {
			*out = i;
			ok = true;
		}
	}
	return ok;
}

/* a.b.c.d into host order; false if malformed. */
static bool parse_ipv4(const char *v, size_t len, u32 *out)
{
	u32 ip = 0, parts = 0;
	size_t i = 0;
	while (parts < 4) {
		size_t s = i;
		while (i < len && v[i] != '.')
			i++;
		u64 b;
		if (!parse_u64(v + s, i - s, &b) || b > 255)
			return false;
		ip = ip << 8 | (u32)b;
		parts++;
		if (i == len)
			break;
		i++;
	}
	if (parts != 4 || i != len)
		return false;
	*out = ip;
	return true;
}

static void parse_option(const char *k, size_t klen, const char *v, size_t vlen)
{
	u64 n;
	bool ok = true;
	if (str_eq_n(k, klen, "cpus")) {
		ok = parse_u64(v, vlen, &n) && n >= 1 && n <= MAX_CPUS;
		if (ok)
			cfg.cpus = (u32)n;
	} else if (str_eq_n(k, klen, "ws")) {
		ok = parse_size(v, vlen, &n);
		if (ok)
			cfg.ws_bytes = n;
	} else if (str_eq_n(k, klen, "pattern")) {
		ok = parse_name(v, vlen, pattern_names, 3, &cfg.pattern);
	} else if (str_eq_n(k, klen, "write")) {
		ok = parse_u64(v, vlen, &n) && n <= 100;
		if (ok)
			cfg.write_pct = (u32)n;
	} else if (str_eq_n(k, klen, "hot_pct")) {
		ok = parse_u64(v, vlen, &n) && n <= 100;
		if (ok)
			cfg.hot_pct = (u32)n;
	} else if (str_eq_n(k, klen, "hot_last")) {
		ok = parse_u64(v, vlen, &n) && n <= 1;
		if (ok)
			cfg.hot_last = n;
	} else if (str_eq_n(k, klen, "rate")) {
		ok = parse_u64(v, vlen, &n) && n <= (1ULL << 32);
		if (ok)
			cfg.rate = n;
	} else if (str_eq_n(k, klen, "report_ms")) {
		ok = parse_u64(v, vlen, &n) && n >= 1 && n <= 3600000;
		if (ok)
			cfg.report_ms = n;
	} else if (str_eq_n(k, klen, "tsc_khz")) {
		ok = parse_u64(v, vlen, &n) && n >= 1000 && n <= 100000000;
		if (ok) {
			cfg.tsc_khz = n;
			cfg.tsc_khz_given = true;
		}
	} else if (str_eq_n(k, klen, "avx")) {
		ok = parse_u64(v, vlen, &n) && n <= 1;
		if (ok)
			cfg.avx = (int)n;
	} else if (str_eq_n(k, klen, "x2apic")) {
		ok = parse_u64(v, vlen, &n) && n <= 1;
		if (ok)
			cfg.x2apic = (int)n;
	} else if (str_eq_n(k, klen, "inject")) {
		ok = parse_name(v, vlen, inject_names, 5, &cfg.inject);
	} else if (str_eq_n(k, klen, "seed")) {
		ok = parse_u64(v, vlen, &n);
		if (ok)
			cfg.seed = n;
	} else if (str_eq_n(k, klen, "virtio_mmio.device")) {
		ok = virtio_mmio_option(v, vlen);
	} else if (str_eq_n(k, klen, "net")) {
		ok = parse_u64(v, vlen, &n) && n <= 1;
		if (ok)
			cfg.net = n == 1;
	} else if (str_eq_n(k, klen, "net_ip")) {
		ok = parse_ipv4(v, vlen, &cfg.net_ip);
	} else if (str_eq_n(k, klen, "net_peer")) {
		ok = parse_ipv4(v, vlen, &cfg.net_peer);
	} else if (str_eq_n(k, klen, "net_port")) {
		ok = parse_u64(v, vlen, &n) && n >= 1 && n <= 65535;
		if (ok)
			cfg.net_port = (u32)n;
	} else if (str_eq_n(k, klen, "net_ms")) {
		ok = parse_u64(v, vlen, &n) && n >= 1 && n <= 10000;
		if (ok)
			cfg.net_ms = n;
	} else if (str_eq_n(k, klen, "disk")) {
		ok = parse_u64(v, vlen, &n) && n <= 1;
		if (ok)
			cfg.disk = n == 1;
	} else if (str_eq_n(k, klen, "disk_bad")) {
		ok = parse_u64(v, vlen, &n) && n <= 1;
		if (ok)
			cfg.disk_bad = n == 1;
	} else if (str_eq_n(k, klen, "disk_batch")) {
		ok = parse_u64(v, vlen, &n) && n >= 1 && n <= 8;
		if (ok)
			cfg.disk_batch = (u32)n;
	} else if (str_eq_n(k, klen, "disk_blocks")) {
		ok = parse_u64(v, vlen, &n) && n >= 1 && n <= 4096;
		if (ok)
			cfg.disk_blocks = n;
	} else if (str_eq_n(k, klen, "disk_ops")) {
		ok = parse_u64(v, vlen, &n);
		if (ok)
			cfg.disk_ops = n;
	} else if (str_eq_n(k, klen, "stream")) {
		ok = parse_u64(v, vlen, &n) && n <= 1;
		if (ok)
			cfg.stream = n == 1;
	}
	/* Unknown keys are ignored. */
	if (!ok) {
		char key[32];
		size_t n2 = MIN(klen, sizeof(key) - 1);
		memcpy(key, k, n2);
		key[n2] = 0;
		bad("FERRY BAD cmdline %s\n", key);
	}
}

static void parse_cmdline(const char *s)
{
	while (*s) {
		while (*s == ' ' || *s == '\t' || *s == '\n')
			s++;
		const char *tok = s;
		while (*s && *s != ' ' && *s != '\t' && *s != '\n')
			s++;
		size_t len = (size_t)(s - tok);
		for (size_t i = 0; i < len; i++) {
			if (tok[i] == '=') {
				parse_option(tok, i, tok + i + 1, len - i - 1);
				break;
			}
		}
	}
}

/* ------------------------------------------------------------ pattern */

static inline u64 page_seed(u64 page, u32 gen)
{
	return mix64((page << 32) ^ gen);
}

static void write_page(u64 page, u32 gen)
{
	volatile u64 *w = ws_page_ptr(page);
	u64 s = page_seed(page, gen);
	for (u32 i = 0; i < WORDS_PER_PAGE; i++)
		w[i] = mix64(s + i);
}

/* Verify a page; on mismatch report it and repair it (so one corruption
 * is reported once).  Returns true if the page was intact. */
static bool verify_page(u32 idx, u64 page)
{
	volatile u64 *w = ws_page_ptr(page);
	u32 gen = mem.gen[page];
	u64 s = page_seed(page, gen);
	u32 first = 0, nbad = 0;
	u64 want0 = 0, got0 = 0;
	for (u32 i = 0; i < WORDS_PER_PAGE; i++) {
		u64 want = mix64(s + i), got = w[i];
		if (got != want) {
			if (!nbad++) {
				first = i;
				want0 = want;
				got0 = got;
			}
		}
	}
	if (!nbad)
		return true;
	bad("FERRY BAD page %lu gen=%u word=%u want=0x%lx got=0x%lx bad_words=%u vcpu=%u pa=0x%lx\n",
	    page, gen, first, want0, got0, nbad, idx, (u64)w);
	write_page(page, gen);
	return false;
}

/* ----------------------------------------------------------- workload */

struct worker {
	u32 idx;
	u64 first, pages;     /* this vCPU's slice of the working set */
	u64 hot;              /* hotcold: size of the hot prefix */
	u64 rng, cursor;
	u64 round, verified;
	u64 last_tsc;
	/* reporting */
	u64 interval, next_report, last_report;
	u64 chk_window, chk_tsc, chk_irqs;
	u32 empty_windows; /* consecutive timer-check windows without an IRQ */
	u32 grace;
	u32 reports;
	bool inject_reg;
	/* dirty-rate limit */
	u64 write_period, next_write;
};

static inline u64 next_rand(struct worker *w)
{
	return mix64(w->rng++);
}

/* Uniform in [0, n) without division. */
static inline u64 below(u64 r, u64 n)
{
	return (u64)(((unsigned __int128)r * n) >> 64);
}

static u64 pick_page(struct worker *w)
{
	switch (cfg.pattern) {
	case PATTERN_SEQ: {
		u64 p = w->cursor;
		if (++w->cursor == w->pages)
			w->cursor = 0;
		return w->first + p;
	}
	case PATTERN_HOTCOLD:
		if (cfg.hot_last) {
			/* The hot tenth at the top of the working set. */
			u64 cold = w->pages - w->hot;
			if (below(next_rand(w), 100) < cfg.hot_pct || !cold)
				return w->first + cold + below(next_rand(w), w->hot);
			return w->first + below(next_rand(w), cold);
		}
		if (below(next_rand(w), 100) < cfg.hot_pct || w->hot == w->pages)
			return w->first + below(next_rand(w), w->hot);
		return w->first + w->hot + below(next_rand(w), w->pages - w->hot);
	default:
		return w->first + below(next_rand(w), w->pages);
	}
}

static void check_tsc(struct worker *w, u64 now)
{
	if (now < w->last_tsc)
		bad("FERRY BAD tsc vcpu=%u prev=%lu now=%lu\n", w->idx, w->last_tsc, now);
	w->last_tsc = now;
}

static void inject(struct worker *w)
{
	if (cfg.inject == INJECT_PAGE) {
		volatile u64 *p = ws_page_ptr(w->first);
		p[7] ^= 1ULL << 13; /* one bit, behind the generation's back */
	} else if (cfg.inject == INJECT_REG) {
		w->inject_reg = true;
	} else {
		percpu[w->idx].inject = cfg.inject; /* ring 0 does the rest */
		syscall0();
	}
	kprintf("FERRY INJECT %s vcpu=%u\n", inject_names[cfg.inject], w->idx);
}

/* Every report interval: TICK line, timer and MSR checks. */
static void maybe_report(struct worker *w)
{
	u64 now = rdtsc();
	check_tsc(w, now);
	if (now < w->next_report)
		return;

	u64 irqs = percpu[w->idx].timer_irqs;
	/* rdmsr needs ring 0: flag it, and the ring-0 call that prints the
	 * TICK line checks the MSRs too. */
	percpu[w->idx].msr_check = 1;
	kprintf("FERRY TICK %u %lu %lu %lu %lu\n", w->idx, w->round, now, irqs, w->verified);
	if (w->idx == 0) {
		disk_report();
		net_report();
	}

	/* After a long gap (VM paused), skip the timer check on this report
	 * and the next: the timer may not have fired since the resume. */
	if (now - w->last_report > 10 * w->interval)
		w->grace = 2;
	/* A pause (migration, snapshot) can swallow the interrupts of the one
	 * window it falls in, whatever the TSC did meanwhile; a working timer
	 * never leaves two windows in a row empty. */
	if (now - w->chk_tsc >= w->chk_window) {
		w->empty_windows = irqs == w->chk_irqs ? w->empty_windows + 1 : 0;
		if (w->grace)
			w->grace--;
		else if (w->empty_windows >= 2)
			bad("FERRY BAD timer vcpu=%u irqs=%lu\n", w->idx, irqs);
		w->chk_tsc = now;
		w->chk_irqs = irqs;
	}

	/* Self-test: vCPU 0 injects one fault at its third report. */
	if (++w->reports == 3 && w->idx == 0 && cfg.inject)
		inject(w);

	w->last_report = now;
	w->next_report += w->interval;
	if (w->next_report <= now) /* fell behind (pause): don't burst */
		w->next_report = now + w->interval;
}

/* Dirty-rate limit: wait (still reporting) until the next write slot. */
static void rate_wait(struct worker *w)
{
	if (!w->write_period)
		return;
	while (rdtsc() < w->next_write) {
		cpu_relax();
		maybe_report(w);
	}
	w->next_write = rdtsc() + w->write_period;
}

static void regcheck_round(struct worker *w, u64 spin)
{
	static const char *const names[21] = {
		"rbx",   "r12",   "r13",   "r14",   "r15",   "xmm8",  "xmm9",
		"xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15", "ymm8h",
		"ymm9h", "ymm10h", "ymm11h", "ymm12h", "ymm13h", "ymm14h", "ymm15h",
	};
	struct regvals v;
	u64 *words = (u64 *)&v;
	u64 s = mix64(((u64)w->idx << 48) ^ w->round);
	for (u32 i = 0; i < sizeof(v) / sizeof(u64); i++)
		words[i] = mix64(s + i);
	u32 mask = regcheck(&v, spin, have_avx, w->inject_reg);
	w->inject_reg = false;
	for (u32 i = 0; i < 21; i++)
		if (mask & (1u << i))
			bad("FERRY BAD reg %s vcpu=%u round=%lu\n", names[i], w->idx, w->round);
}

/* ------------------------------------------------------------- stream */

/*
 * stream=1: instead of the workload, each vCPU prints the deterministic
 * line stream `FERRY STREAM <vcpu> <seq> <payload> 0x<sum>` as fast as it
 * can; every byte is one `out` to the UART (one port I/O exit), between
 * an `in` of the line status and an `in` of IIR that must find the byte's
 * THR-empty interrupt.  The payload of line `seq` depends on (vcpu, seq)
 * only, and `sum` is FNV-1a over the payloads of lines 0..=seq, so the
 * host catches a byte lost or doubled anywhere in the stream; the guest
 * catches a port read done twice (`FERRY BAD uart`).  guest/src/lib.rs has
 * the reference (`stream_payload`, `stream_sum`).
 */
#define STREAM_MAX_PAYLOAD 48
#define FNV_OFFSET 0xcbf29ce484222325ULL
#define FNV_PRIME 0x100000001b3ULL

static size_t stream_payload(u32 idx, u64 seq, char *out)
{
	static const char alphabet[] =
		"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
	u64 h = mix64(((u64)idx << 56) ^ seq);
	size_t len = 1 + (size_t)(h % STREAM_MAX_PAYLOAD);
	for (size_t i = 0; i < len; i++)
		out[i] = alphabet[mix64(h + i) % 62];
	out[len] = 0;
	return len;
}

static __attribute__((noreturn)) void stream(u32 idx)
{
	char payload[STREAM_MAX_PAYLOAD + 1];
	u64 sum = FNV_OFFSET;
	kprintf("FERRY READY %u\n", idx);
	for (u64 seq = 0;; seq++) {
		size_t len = stream_payload(idx, seq, payload);
		for (size_t i = 0; i < len; i++)
			sum = (sum ^ (u8)payload[i]) * FNV_PRIME;
		kprintf("FERRY STREAM %u %lu %s 0x%lx\n", idx, seq, payload, sum);
		u64 missed = __atomic_exchange_n(&thre_missed, 0, __ATOMIC_RELAXED);
		if (missed)
			bad("FERRY BAD uart thre_missed=%lu vcpu=%u seq=%lu\n", missed, idx, seq);
	}
}

/* What the disk workload does while it waits for the device. */
static void idle_report(void *w)
{
	net_step();
	maybe_report(w);
}

/* The workload, in ring 3. */
static __attribute__((noreturn)) void workload(u64 idx64)
{
	u32 idx = (u32)idx64;
	if (cfg.stream)
		stream(idx);
	struct worker w = { .idx = idx };
	w.pages = mem.ws_pages / cfg.cpus;
	w.first = idx * w.pages;
	w.hot = MAX(w.pages / 10, 1);
	w.rng = mix64(cfg.seed) ^ ((u64)idx << 56);

	for (u64 p = w.first; p < w.first + w.pages; p++) {
		mem.gen[p] = 0;
		write_page(p, 0);
	}
	kprintf("FERRY READY %u\n", idx);

	u64 now = rdtsc();
	w.last_tsc = now;
	w.interval = cfg.tsc_khz * cfg.report_ms;
	w.next_report = now + w.interval;
	w.last_report = now;
	/* Timer check needs >= 2 periods (20 ms at 100 Hz) to be meaningful. */
	w.chk_window = MAX(w.interval, cfg.tsc_khz * 20);
	w.chk_tsc = now;
	w.chk_irqs = percpu[idx].timer_irqs;
	if (cfg.rate) /* per-vCPU share of the global dirty rate */
		w.write_period = MAX(cfg.tsc_khz * 1000 * cfg.cpus / cfg.rate, 1);
	w.next_write = now;
	u64 spin = cfg.tsc_khz * REGCHECK_US / 1000;
	if (idx == 0)
		disk_start(idle_report, &w);

	for (;;) {
		for (u32 op = 0; op < OPS_PER_ROUND; op++) {
			u64 page = pick_page(&w);
			verify_page(idx, page);
			w.verified++;
			if (below(next_rand(&w), 100) < cfg.write_pct) {
				rate_wait(&w);
				u32 gen = mem.gen[page] + 1;
				mem.gen[page] = gen;
				write_page(page, gen);
			}
		}
		regcheck_round(&w, spin);
		if (idx == 0) {
			disk_step(idle_report, &w);
			net_step();
		}
		w.round++;
		maybe_report(&w);
	}
}

/* ---------------------------------------------------------------- boot */

void guest_main(u32 idx, u64 start_info_pa)
{
	percpu[idx].idx = idx;
	if (idx == 0) {
		uart_init();
		cpu_detect_features();
		start_info_read(start_info_pa, cmdline, sizeof(cmdline));
		parse_cmdline(cmdline);
		if (cfg.stream)
			uart_check_thre();
		if (cfg.avx == 0)
			have_avx = false;
		if (cfg.x2apic == 0)
			have_x2apic = false;
		pic_disable();
		if (!cfg.tsc_khz) {
			cfg.tsc_khz = tsc_calibrate_pit();
			pic_disable();
		if (!cfg.tsc_khz) {
				bad("FERRY BAD tsc_khz calibration failed\n");
				cfg.tsc_khz = 2000000;
			}
		}
		mm_setup();
		disk_init(mem.dma_pa);
		net_init(mem.dma_pa + NET_DMA_OFFSET);
		idt_build();
		kprintf("FERRY BOOT cpus=%u mem_mib=%lu ws_pages=%lu pattern=%s write=%u rate=%lu "
			"report_ms=%lu tsc_khz=%lu avx=%u x2apic=%u\n",
			cfg.cpus, mem.ram_bytes >> 20, mem.ws_pages, pattern_names[cfg.pattern],
			cfg.write_pct, cfg.rate, cfg.report_ms, cfg.tsc_khz, (u32)have_avx,
			(u32)have_x2apic);
		for (u32 i = 0; i < mem.nsegs; i++)
			kprintf("FERRY WS seg=%u pa=0x%lx pages=%lu first_page=%lu\n", i,
				mem.segs[i].pa, mem.segs[i].pages, mem.segs[i].first_page);
		__atomic_store_n(&boot_release, 1, __ATOMIC_RELEASE);
	} else {
		while (!__atomic_load_n(&boot_release, __ATOMIC_ACQUIRE))
			cpu_relax();
		if (idx >= cfg.cpus)
			halt_forever();
		write_cr3(mem.pml4_pa);
	}
	cpu_init(idx);
	apic_timer_start(idx);
	msr_setup(idx);
	enter_user(workload, user_stack_top(idx), idx);
}
