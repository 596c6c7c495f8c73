/*
 * virtio-mmio network driver (split virtqueues, polled) and the echo
 * workload.
 *
 * With `net=1`, the BSP sets up the first virtio-net device on the
 * command line (device ID 1) in ring 0 at boot, and vCPU 0's ring-3
 * workload polls it every round:
 *
 *  - the guest is `net_ip`, its peer `net_peer`, both on one Ethernet;
 *    the guest answers ARP requests for its address and resolves the
 *    peer's MAC by ARP (again every 200 ms until it answers);
 *  - every `net_ms` (default 10) it sends a UDP datagram from and to
 *    `net_port` whose 64-byte payload is NET_MAGIC, the sequence number
 *    and six words derived from it; the peer echoes it back;
 *  - an echo must carry a payload exactly as sent, for a number that was
 *    sent: anything else is `FERRY BAD net`;
 *  - a number not echoed within NET_AGE sends (500 ms at 10 ms) is lost.
 *
 * Every report prints `FERRY NET <sent> <echoed> <lost> <late> <dup>
 * <arp>`, and the MAC is read again from the configuration space: a VM
 * restored with another MAC (a clone) uses it from then on and says so
 * with `FERRY NETMAC <mac>`.
 */
#include "guest.h"

#define NQ 16
#define BUF_BYTES 2048
#define VNET_HDR 12
#define NET_MAGIC 0x54454e5952524546ULL /* "FERRYNET" */
#define PAYLOAD_WORDS 8
#define WINDOW 1024
#define NET_AGE 50

#include "virtio_mmio.h"

#define F_MAC 5
#define DESC_WRITE 2

struct ndesc {
	u64 addr;
	u32 len;
	u16 flags;
	u16 next;
};

struct navail {
	u16 flags;
	u16 idx;
	u16 ring[NQ];
};

struct nused {
	u16 flags;
	u16 idx;
	struct {
		u32 id;
		u32 len;
	} ring[NQ];
};

struct vq {
	volatile struct ndesc *desc;
	volatile struct navail *avail;
	volatile struct nused *used;
	u64 bufs;
	u16 avail_idx, used_seen;
};

static struct {
	bool on;
	u64 base;
	u8 mac[6], peer_mac[6];
	bool peer_known;
	struct vq rx, tx;
	u64 sent, echoed, lost_old, late, dup, arp, rx_frames;
	u64 next_send, next_arp, period;
	u32 echoed_seq[WINDOW]; /* seq + 1 when echoed, for seq % WINDOW */
	u64 rng_seed;
} n;

static inline u32 rd(u32 off)
{
	return mmio_read32(n.base + off);
}

static inline void wr(u32 off, u32 v)
{
	mmio_write32(n.base + off, v);
}

static void read_mac(u8 *mac)
{
	u32 a = rd(R_CONFIG), b = rd(R_CONFIG + 4);
	for (u32 i = 0; i < 4; i++)
		mac[i] = (u8)(a >> (8 * i));
	mac[4] = (u8)b;
	mac[5] = (u8)(b >> 8);
}

static void setup_queue(u32 q, struct vq *v, u64 pa, bool rx)
{
	v->desc = (volatile struct ndesc *)pa;
	v->avail = (volatile struct navail *)(pa + 512);
	v->used = (volatile struct nused *)(pa + 1024);
	v->bufs = pa + PAGE_SIZE;
	for (u32 i = 0; i < NQ; i++)
		v->desc[i] = (struct ndesc){ v->bufs + (u64)i * BUF_BYTES, BUF_BYTES,
					     (u16)(rx ? DESC_WRITE : 0), 0 };
	wr(R_QUEUE_SEL, q);
	wr(R_QUEUE_NUM, NQ);
	wr(R_QUEUE_DESC, (u32)pa);
	wr(R_QUEUE_DESC + 4, (u32)(pa >> 32));
	wr(R_QUEUE_AVAIL, (u32)(u64)v->avail);
	wr(R_QUEUE_AVAIL + 4, (u32)((u64)v->avail >> 32));
	wr(R_QUEUE_USED, (u32)(u64)v->used);
	wr(R_QUEUE_USED + 4, (u32)((u64)v->used >> 32));
	wr(R_QUEUE_READY, 1);
}

/* Ring 0, BSP, at boot; `dma_pa` has NET_DMA_PAGES fresh pages. */
void net_init(u64 dma_pa)
{
	if (!cfg.net)
		return;
	for (u32 i = 0; i < virtio_count(); i++) {
		u64 b = virtio_base(i);
		if (mmio_read32(b + R_MAGIC) == 0x74726976 && mmio_read32(b + R_VERSION) == 2 &&
		    mmio_read32(b + R_DEVICE_ID) == 1) {
			n.base = b;
			break;
		}
	}
	if (!n.base) {
		bad("FERRY BAD net no virtio-net device\n");
		return;
	}
	if (!cfg.net_ip || !cfg.net_peer) {
		bad("FERRY BAD net needs net_ip= and net_peer=\n");
		return;
	}
	wr(R_STATUS, 0);
	wr(R_STATUS, 1);
	wr(R_STATUS, 3);
	wr(R_DEV_FEATURES_SEL, 0);
	u32 f0 = rd(R_DEV_FEATURES);
	if (!(f0 & (1u << F_MAC))) {
		bad("FERRY BAD net no MAC feature=0x%x\n", f0);
		return;
	}
	wr(R_DRV_FEATURES_SEL, 0);
	wr(R_DRV_FEATURES, 1u << F_MAC);
	wr(R_DRV_FEATURES_SEL, 1);
	wr(R_DRV_FEATURES, 1); /* VERSION_1 */
	wr(R_STATUS, 3 | 8);
	if (!(rd(R_STATUS) & 8)) {
		bad("FERRY BAD net features refused\n");
		return;
	}
	wr(R_QUEUE_SEL, 0);
	if (rd(R_QUEUE_NUM_MAX) < NQ) {
		bad("FERRY BAD net queue too small\n");
		return;
	}
	/* Per queue: one page of rings, then NQ buffers of 2 KiB. */
	setup_queue(0, &n.rx, dma_pa, true);
	setup_queue(1, &n.tx, dma_pa + (1 + NQ * BUF_BYTES / PAGE_SIZE) * PAGE_SIZE, false);
	for (u16 i = 0; i < NQ; i++)
		n.rx.avail->ring[i] = i;
	n.rx.avail_idx = NQ;
	__atomic_store_n(&n.rx.avail->idx, NQ, __ATOMIC_RELEASE);
	wr(R_STATUS, 3 | 8 | 4);
	wr(R_QUEUE_NOTIFY, 0);
	read_mac(n.mac);
	n.rng_seed = mix64(cfg.seed ^ 0x6e6574);
	n.on = true;
	kprintf("FERRY NETINFO mac=%02x:%02x:%02x:%02x:%02x:%02x\n", n.mac[0], n.mac[1], n.mac[2],
		n.mac[3], n.mac[4], n.mac[5]);
}

/* ------------------------------------------------------------ frames */

static inline void put16(volatile u8 *p, u16 v)
{
	p[0] = (u8)(v >> 8);
	p[1] = (u8)v;
}

static inline u16 get16(const volatile u8 *p)
{
	return (u16)(p[0] << 8 | p[1]);
}

static inline void put32(volatile u8 *p, u32 v)
{
	put16(p, (u16)(v >> 16));
	put16(p + 2, (u16)v);
}

static inline u32 get32(const volatile u8 *p)
{
	return (u32)get16(p) << 16 | get16(p + 2);
}

static void copy_mac(volatile u8 *d, const volatile u8 *s)
{
	for (u32 i = 0; i < 6; i++)
		d[i] = s[i];
}

static bool mac_eq(const volatile u8 *a, const volatile u8 *b)
{
	for (u32 i = 0; i < 6; i++)
		if (a[i] != b[i])
			return false;
	return true;
}

/* The next free TX buffer's frame (after the virtio header), or NULL. */
static volatile u8 *tx_frame(void)
{
	/* Reclaim what the device sent. */
	n.tx.used_seen = __atomic_load_n(&n.tx.used->idx, __ATOMIC_ACQUIRE);
	if ((u16)(n.tx.avail_idx - n.tx.used_seen) >= NQ)
		return NULL;
	volatile u8 *b = (volatile u8 *)(n.tx.bufs + (u64)(n.tx.avail_idx % NQ) * BUF_BYTES);
	for (u32 i = 0; i < VNET_HDR; i++)
		b[i] = 0;
	return b + VNET_HDR;
}

static void tx_send(u32 len)
{
	u16 i = n.tx.avail_idx % NQ;
	n.tx.desc[i].len = VNET_HDR + len;
	n.tx.avail->ring[i] = i;
	n.tx.avail_idx++;
	__atomic_store_n(&n.tx.avail->idx, n.tx.avail_idx, __ATOMIC_RELEASE);
	__atomic_thread_fence(__ATOMIC_SEQ_CST);
	wr(R_QUEUE_NOTIFY, 1);
}

static void send_arp(u16 op, const volatile u8 *dst_mac, u32 dst_ip)
{
	volatile u8 *f = tx_frame();
	if (!f)
		return;
	static const u8 bcast[6] = { 0xff, 0xff, 0xff, 0xff, 0xff, 0xff };
	static const u8 zero[6] = { 0 };
	copy_mac(f, op == 1 ? bcast : dst_mac);
	copy_mac(f + 6, n.mac);
	put16(f + 12, 0x0806);
	put16(f + 14, 1);
	put16(f + 16, 0x0800);
	f[18] = 6;
	f[19] = 4;
	put16(f + 20, op);
	copy_mac(f + 22, n.mac);
	put32(f + 28, cfg.net_ip);
	copy_mac(f + 32, op == 1 ? zero : dst_mac);
	put32(f + 38, dst_ip);
	for (u32 i = 42; i < 60; i++)
		f[i] = 0;
	tx_send(60);
}

static u16 ip_csum(const volatile u8 *h)
{
	u32 s = 0;
	for (u32 i = 0; i < 20; i += 2)
		s += get16(h + i);
	while (s >> 16)
		s = (s & 0xffff) + (s >> 16);
	return (u16)~s;
}

static inline u64 payload_word(u64 seq, u32 i)
{
	return i == 0 ? NET_MAGIC : i == 1 ? seq : mix64(n.rng_seed + seq * PAYLOAD_WORDS + i);
}

static void send_datagram(void)
{
	volatile u8 *f = tx_frame();
	if (!f)
		return;
	u64 seq = n.sent;
	u32 plen = PAYLOAD_WORDS * 8;
	copy_mac(f, n.peer_mac);
	copy_mac(f + 6, n.mac);
	put16(f + 12, 0x0800);
	volatile u8 *ip = f + 14;
	ip[0] = 0x45;
	ip[1] = 0;
	put16(ip + 2, (u16)(20 + 8 + plen));
	put16(ip + 4, (u16)seq);
	put16(ip + 6, 0x4000); /* DF */
	ip[8] = 64;
	ip[9] = 17;
	put16(ip + 10, 0);
	put32(ip + 12, cfg.net_ip);
	put32(ip + 16, cfg.net_peer);
	put16(ip + 10, ip_csum(ip));
	volatile u8 *udp = ip + 20;
	put16(udp, (u16)cfg.net_port);
	put16(udp + 2, (u16)cfg.net_port);
	put16(udp + 4, (u16)(8 + plen));
	put16(udp + 6, 0); /* no checksum */
	volatile u64 *p = (volatile u64 *)(udp + 8);
	for (u32 i = 0; i < PAYLOAD_WORDS; i++)
		p[i] = payload_word(seq, i);
	/* A number leaving the window unechoed is lost for good. */
	u32 slot = (u32)(seq % WINDOW);
	if (seq >= WINDOW && n.echoed_seq[slot] != (u32)(seq - WINDOW + 1))
		n.lost_old++;
	n.echoed_seq[slot] = 0;
	n.sent++;
	tx_send(14 + 20 + 8 + plen);
}

/* ------------------------------------------------------------ receive */

static void on_echo(const volatile u8 *payload, u32 len)
{
	if (len < PAYLOAD_WORDS * 8) {
		bad("FERRY BAD net short echo len=%u\n", len);
		return;
	}
	u64 seq = ((const volatile u64 *)payload)[1];
	if (seq >= n.sent) {
		bad("FERRY BAD net echo of seq=%lu never sent (sent=%lu)\n", seq, n.sent);
		return;
	}
	for (u32 i = 0; i < PAYLOAD_WORDS; i++) {
		u64 got = ((const volatile u64 *)payload)[i];
		if (got != payload_word(seq, i)) {
			bad("FERRY BAD net corrupted echo seq=%lu word=%u got=0x%lx\n", seq, i, got);
			return;
		}
	}
	if (seq + WINDOW < n.sent) {
		n.late++;
		return;
	}
	u32 slot = (u32)(seq % WINDOW);
	if (n.echoed_seq[slot] == (u32)(seq + 1)) {
		n.dup++;
		return;
	}
	n.echoed_seq[slot] = (u32)(seq + 1);
	n.echoed++;
}

static void on_frame(const volatile u8 *f, u32 len)
{
	if (len < 14)
		return;
	u16 type = get16(f + 12);
	if (type == 0x0806 && len >= 42) {
		u16 op = get16(f + 20);
		u32 sip = get32(f + 28), tip = get32(f + 38);
		if (sip == cfg.net_peer && (op == 2 || tip == cfg.net_ip)) {
			if (!n.peer_known || !mac_eq(n.peer_mac, f + 22))
				n.arp++;
			copy_mac(n.peer_mac, f + 22);
			n.peer_known = true;
		}
		if (op == 1 && tip == cfg.net_ip)
			send_arp(2, f + 22, sip);
		return;
	}
	if (type != 0x0800 || len < 14 + 28)
		return;
	const volatile u8 *ip = f + 14;
	u32 ihl = (u32)(ip[0] & 15) * 4;
	if ((ip[0] >> 4) != 4 || ihl < 20 || ip[9] != 17 || get32(ip + 16) != cfg.net_ip ||
	    get32(ip + 12) != cfg.net_peer || len < 14 + ihl + 8)
		return;
	const volatile u8 *udp = ip + ihl;
	if (get16(udp + 2) != cfg.net_port)
		return;
	u32 ulen = get16(udp + 4);
	if (ulen < 8 || 14 + ihl + ulen > len)
		return;
	on_echo(udp + 8, ulen - 8);
}

static void poll_rx(void)
{
	u16 idx = __atomic_load_n(&n.rx.used->idx, __ATOMIC_ACQUIRE);
	if (idx == n.rx.used_seen)
		return;
	while (n.rx.used_seen != idx) {
		u32 id = n.rx.used->ring[n.rx.used_seen % NQ].id;
		u32 len = n.rx.used->ring[n.rx.used_seen % NQ].len;
		n.rx.used_seen++;
		if (id >= NQ) {
			bad("FERRY BAD net rx used id=%u\n", id);
			continue;
		}
		n.rx_frames++;
		if (len > VNET_HDR && len <= BUF_BYTES)
			on_frame((const volatile u8 *)(n.rx.bufs + (u64)id * BUF_BYTES + VNET_HDR),
				 len - VNET_HDR);
		n.rx.avail->ring[n.rx.avail_idx % NQ] = (u16)id;
		n.rx.avail_idx++;
	}
	__atomic_store_n(&n.rx.avail->idx, n.rx.avail_idx, __ATOMIC_RELEASE);
	__atomic_thread_fence(__ATOMIC_SEQ_CST);
	wr(R_QUEUE_NOTIFY, 0);
}

/* Ring 3, vCPU 0, every round. */
void net_step(void)
{
	if (!n.on)
		return;
	poll_rx();
	u64 now = rdtsc();
	if (!n.period)
		n.period = cfg.tsc_khz * cfg.net_ms;
	if (!n.peer_known) {
		if (now >= n.next_arp) {
			send_arp(1, 0, cfg.net_peer);
			n.next_arp = now + cfg.tsc_khz * 200;
		}
		return;
	}
	if (now >= n.next_send) {
		send_datagram();
		n.next_send += n.period;
		if (n.next_send <= now) /* fell behind (a pause): no burst */
			n.next_send = now + n.period;
	}
}

/* Ring 3, vCPU 0, with every report. */
void net_report(void)
{
	if (!n.on)
		return;
	u8 mac[6];
	read_mac(mac);
	if (!mac_eq(mac, n.mac)) {
		copy_mac(n.mac, mac);
		kprintf("FERRY NETMAC %02x:%02x:%02x:%02x:%02x:%02x\n", mac[0], mac[1], mac[2],
			mac[3], mac[4], mac[5]);
	}
	u64 pending_lost = 0;
	u64 lo = n.sent > WINDOW ? n.sent - WINDOW : 0;
	for (u64 s = lo; s + NET_AGE < n.sent; s++)
		if (n.echoed_seq[s % WINDOW] != (u32)(s + 1))
			pending_lost++;
	kprintf("FERRY NET %lu %lu %lu %lu %lu %lu\n", n.sent, n.echoed, n.lost_old + pending_lost,
		n.late, n.dup, n.arp);
}
