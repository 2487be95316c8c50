/* _tally.c: count a sock_diag dump's records in C (loaded by monitor/native.py through ctypes).
 *
 * The pure-Python decoder in sockdiag.py spends ~60 ns per socket in Counter passes; at
 * 130,000 TIME_WAIT sockets that is as much CPU as the kernel's own dump. This file does the
 * same counting in one pass over each datagram as it arrives. It reads only the netlink wire
 * format (struct nlmsghdr + struct inet_diag_msg + attributes, a stable kernel ABI), no
 * kernel structs, and uses no Python API, so it builds with gcc alone.
 */
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define NLMSG_HDRLEN 16
#define NLMSG_ERROR 2
#define NLMSG_DONE 3
#define TCPDIAG_GETSOCK 18
#define SOCK_DIAG_BY_FAMILY 20
#define RECORD 88 /* nlmsghdr + struct inet_diag_msg */
#define OFF_FAMILY 16
#define OFF_STATE 17
#define OFF_SPORT 20
#define OFF_DPORT 22
#define OFF_DST 40
#define OFF_EXPIRES 68
#define INET_DIAG_SHUTDOWN 8 /* only full sockets carry it */
#define NLA_TYPE_MASK 0x3FFF
#define AF_INET_ 2
#define AF_INET6_ 10

enum { ST_SYN_RECV = 3, ST_TIME_WAIT = 6, ST_LISTEN = 10, ST_NEW_SYN_RECV = 12 };

/* Return codes of tcpstate_tally_chunk; errors fill struct tcpstate_tally_error. */
enum {
	TALLY_MORE = 0,
	TALLY_DONE = 1,
	TALLY_MALFORMED = 2,     /* offset, length of the bad message */
	TALLY_SHORT_RECORD = 3,  /* length */
	TALLY_SHORT_ERROR = 4,   /* offset */
	TALLY_DUMP_ERROR = 5,    /* errnum: NLMSG_ERROR */
	TALLY_PARTIAL_ERROR = 6, /* errnum: an errno inside NLMSG_DONE */
	TALLY_NOMEM = 7,
	TALLY_BAD_ERRNO = 8, /* errnum: the raw value, not a negative errno */
};

struct tcpstate_tally_error {
	uint64_t offset;
	uint64_t length;
	int32_t errnum;
};

/* One remote endpoint seen from ephemeral local ports (mirrored by native.py's Endpoint).
 * The key is the last 20 bytes: port, family, used, address. */
struct tcpstate_endpoint {
	uint32_t time_wait_recent; /* TIME_WAIT entered within the window (all of it without one) */
	uint32_t time_wait_older;
	uint32_t other; /* sockets in another state that holds a 4-tuple */
	uint16_t port;  /* host order */
	uint8_t family; /* IPv4-mapped IPv6 peers are keyed as IPv4 */
	uint8_t used;
	uint8_t addr[16]; /* IPv4: the first 4 bytes, the rest zero */
};
#define KEY_OFF 12
#define KEY_LEN 20

struct tcpstate_tally {
	uint64_t states[13]; /* by state number; request sockets as NEW_SYN_RECV (12) */
	uint32_t time_wait_ports[2][65536]; /* [0] local, [1] remote */
	uint32_t port_first, port_last;    /* the ephemeral range; port_last 0: no endpoints */
	uint8_t listening[65536 / 8];      /* bit p (byte p / 8, lowest bit first): a listener holds port p */
	int64_t recent_ms;                 /* < 0: no recent/older split */
	struct tcpstate_endpoint *endpoints; /* open addressing */
	uint64_t endpoints_used, endpoints_cap; /* cap a power of two */
};

struct tcpstate_tally *tcpstate_tally_new(uint32_t port_first, uint32_t port_last, int64_t recent_ms)
{
	struct tcpstate_tally *t = calloc(1, sizeof(*t));
	if (!t)
		return NULL;
	t->port_first = port_first;
	t->port_last = port_last;
	t->recent_ms = recent_ms;
	t->endpoints_cap = 64;
	t->endpoints = calloc(t->endpoints_cap, sizeof(*t->endpoints));
	if (!t->endpoints) {
		free(t);
		return NULL;
	}
	return t;
}

/* Set the ports LISTEN sockets hold (a 65536-bit set as above), before the first chunk. */
void tcpstate_tally_listening(struct tcpstate_tally *t, const uint8_t *bits8192)
{
	memcpy(t->listening, bits8192, sizeof(t->listening));
}

void tcpstate_tally_free(struct tcpstate_tally *t)
{
	if (t) {
		free(t->endpoints);
		free(t);
	}
}

static inline uint64_t load64(const uint8_t *p)
{
	uint64_t v;
	memcpy(&v, p, sizeof(v));
	return v;
}

static inline uint64_t mix64(uint64_t x) /* splitmix64's finalizer */
{
	x ^= x >> 30;
	x *= 0xBF58476D1CE4E5B9ull;
	x ^= x >> 27;
	x *= 0x94D049BB133111EBull;
	return x ^ (x >> 31);
}

static inline uint64_t endpoint_hash(const struct tcpstate_endpoint *e)
{
	const uint8_t *k = (const uint8_t *)e + KEY_OFF;
	uint32_t tail;
	memcpy(&tail, k + 16, 4);
	return mix64(load64(k) ^ mix64(load64(k + 8) ^ mix64(tail)));
}

static struct tcpstate_endpoint *slot_for(struct tcpstate_endpoint *table, uint64_t cap,
					  const struct tcpstate_endpoint *key)
{
	uint64_t i = endpoint_hash(key) & (cap - 1);
	for (;;) {
		struct tcpstate_endpoint *s = &table[i];
		if (!s->used || !memcmp((const uint8_t *)s + KEY_OFF, (const uint8_t *)key + KEY_OFF, KEY_LEN))
			return s;
		i = (i + 1) & (cap - 1);
	}
}

static int grow(struct tcpstate_tally *t)
{
	uint64_t cap = t->endpoints_cap * 2;
	struct tcpstate_endpoint *table = calloc(cap, sizeof(*table));
	if (!table)
		return -1;
	for (uint64_t i = 0; i < t->endpoints_cap; i++) {
		if (t->endpoints[i].used)
			*slot_for(table, cap, &t->endpoints[i]) = t->endpoints[i];
	}
	free(t->endpoints);
	t->endpoints = table;
	t->endpoints_cap = cap;
	return 0;
}

/* The entry for key (its counts zero when new), or NULL when out of memory. */
static struct tcpstate_endpoint *endpoint_entry(struct tcpstate_tally *t, const struct tcpstate_endpoint *key)
{
	struct tcpstate_endpoint *s = slot_for(t->endpoints, t->endpoints_cap, key);
	if (s->used)
		return s;
	if (2 * (t->endpoints_used + 1) > t->endpoints_cap) { /* keep the load under one half */
		if (grow(t))
			return NULL;
		s = slot_for(t->endpoints, t->endpoints_cap, key);
	}
	*s = *key;
	t->endpoints_used++;
	return s;
}

static int is_full_socket(const uint8_t *rec, uint32_t length)
{
	uint64_t pos = RECORD;
	while (pos + 4 <= length) {
		uint16_t nla_len, nla_type;
		memcpy(&nla_len, rec + pos, 2);
		memcpy(&nla_type, rec + pos + 2, 2);
		if (nla_len < 4)
			break;
		if ((nla_type & NLA_TYPE_MASK) == INET_DIAG_SHUTDOWN)
			return 1;
		pos += (nla_len + 3u) & ~3u;
	}
	return 0;
}

static int count_record(struct tcpstate_tally *t, const uint8_t *rec, uint32_t length)
{
	uint8_t state = rec[OFF_STATE];
	uint16_t sport = (uint16_t)(rec[OFF_SPORT] << 8 | rec[OFF_SPORT + 1]);
	if (state == ST_SYN_RECV && !is_full_socket(rec, length))
		t->states[ST_NEW_SYN_RECV]++;
	else if (state >= 1 && state <= 12)
		t->states[state]++;
	if (state == ST_TIME_WAIT) {
		t->time_wait_ports[0][sport]++;
		t->time_wait_ports[1][rec[OFF_DPORT] << 8 | rec[OFF_DPORT + 1]]++;
	}
	/* Listeners, the server side of a handshake and the sockets a listener accepted use the
	 * listener's port, taking no ephemeral port of this host; their peers are outsiders' picks,
	 * not endpoints this host connects to. */
	if (!t->port_last || sport < t->port_first || sport > t->port_last || state == ST_LISTEN ||
	    state == ST_SYN_RECV || (t->listening[sport >> 3] >> (sport & 7) & 1))
		return 0;
	static const uint8_t v4_mapped[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xFF, 0xFF};
	struct tcpstate_endpoint key;
	memset(&key, 0, sizeof(key));
	key.used = 1;
	key.family = rec[OFF_FAMILY];
	key.port = (uint16_t)(rec[OFF_DPORT] << 8 | rec[OFF_DPORT + 1]);
	if (key.family != AF_INET6_) { /* IPv4 (and, as in Python, any family but IPv6): 4 bytes */
		memcpy(key.addr, rec + OFF_DST, 4);
	} else if (!memcmp(rec + OFF_DST, v4_mapped, 12)) {
		/* A dual-stack socket talking to an IPv4 peer: the same endpoint as over IPv4. */
		key.family = AF_INET_;
		memcpy(key.addr, rec + OFF_DST + 12, 4);
	} else {
		memcpy(key.addr, rec + OFF_DST, 16);
	}
	struct tcpstate_endpoint *e = endpoint_entry(t, &key);
	if (!e)
		return -1;
	if (state != ST_TIME_WAIT) {
		e->other++;
	} else {
		uint32_t expires;
		memcpy(&expires, rec + OFF_EXPIRES, 4);
		/* A TIME_WAIT timer starts at 60 s: at least recent_ms left means a recent entry. It
		 * fits 16 bits; only those are compared, as the Python decoder does. */
		if (t->recent_ms < 0 || (expires & 0xFFFF) >= (uint64_t)t->recent_ms)
			e->time_wait_recent++;
		else
			e->time_wait_older++;
	}
	return 0;
}

static int bad_errno(int32_t e)
{
	return e >= 0 || e <= -4096; /* the kernel's errnos are -1 .. -4095 */
}

/* Count every record of one datagram of a dump. As in sockdiag.split_records, the first message
 * that is not a record ends the records of a datagram: after it only NLMSG_DONE or NLMSG_ERROR
 * matter. */
int tcpstate_tally_chunk(struct tcpstate_tally *t, const uint8_t *buf, uint64_t n,
			 struct tcpstate_tally_error *err)
{
	uint64_t off = 0;
	int records = 1;
	while (off + NLMSG_HDRLEN <= n) {
		uint32_t length;
		uint16_t kind;
		memcpy(&length, buf + off, 4);
		memcpy(&kind, buf + off + 4, 2);
		if (length < NLMSG_HDRLEN || off + length > n) {
			err->offset = off;
			err->length = length;
			return TALLY_MALFORMED;
		}
		if (kind == TCPDIAG_GETSOCK || kind == SOCK_DIAG_BY_FAMILY) {
			if (!records) {
				off += ((uint64_t)length + 3) & ~(uint64_t)3;
				continue;
			}
			if (length < RECORD) {
				err->length = length;
				return TALLY_SHORT_RECORD;
			}
			if (count_record(t, buf + off, length))
				return TALLY_NOMEM;
		} else if (kind == NLMSG_DONE) {
			/* A dump that failed part way ends with the negative errno in NLMSG_DONE. */
			if (length >= NLMSG_HDRLEN + 4) {
				int32_t e;
				memcpy(&e, buf + off + NLMSG_HDRLEN, 4);
				if (e < 0) {
					err->errnum = e;
					return bad_errno(e) ? TALLY_BAD_ERRNO : TALLY_PARTIAL_ERROR;
				}
			}
			return TALLY_DONE;
		} else if (kind == NLMSG_ERROR) {
			int32_t e;
			if (length < NLMSG_HDRLEN + 4) {
				err->offset = off;
				return TALLY_SHORT_ERROR;
			}
			memcpy(&e, buf + off + NLMSG_HDRLEN, 4);
			if (e) {
				err->errnum = e;
				return bad_errno(e) ? TALLY_BAD_ERRNO : TALLY_DUMP_ERROR;
			}
			return TALLY_DONE;
		} else {
			records = 0;
		}
		off += ((uint64_t)length + 3) & ~(uint64_t)3;
	}
	return TALLY_MORE;
}

void tcpstate_tally_states(const struct tcpstate_tally *t, uint64_t *out13)
{
	memcpy(out13, t->states, sizeof(t->states));
}

/* Copy one side's 65536 TIME_WAIT-per-port bins (side 0 local, 1 remote). */
void tcpstate_tally_bins(const struct tcpstate_tally *t, int side, uint32_t *out65536)
{
	memcpy(out65536, t->time_wait_ports[side ? 1 : 0], sizeof(t->time_wait_ports[0]));
}

/* The n ports with most TIME_WAIT sockets on one side, most first, ties by lower port; returns
 * how many were written (fewer when fewer ports have any) and sets *total to all of them. */
uint64_t tcpstate_tally_top(const struct tcpstate_tally *t, int side, uint64_t n, uint16_t *ports,
			    uint32_t *counts, uint64_t *total)
{
	const uint32_t *bins = t->time_wait_ports[side ? 1 : 0];
	uint64_t have = 0, sum = 0;
	for (uint32_t port = 1; port < 65536; port++) {
		uint32_t c = bins[port];
		if (!c)
			continue;
		sum += c;
		/* Scanning ports upwards and moving only past strictly smaller counts keeps ties in port order. */
		if (have == n && (n == 0 || counts[n - 1] >= c))
			continue;
		uint64_t i = have < n ? have++ : n - 1;
		while (i > 0 && counts[i - 1] < c) {
			counts[i] = counts[i - 1];
			ports[i] = ports[i - 1];
			i--;
		}
		counts[i] = c;
		ports[i] = (uint16_t)port;
	}
	*total = sum; /* bin 0 is left out: no socket has port 0 */
	return have;
}

uint64_t tcpstate_tally_endpoint_count(const struct tcpstate_tally *t)
{
	return t->endpoints_used;
}

/* Copy up to max distinct endpoints; returns how many were copied. */
uint64_t tcpstate_tally_endpoints(const struct tcpstate_tally *t, struct tcpstate_endpoint *out, uint64_t max)
{
	uint64_t k = 0;
	for (uint64_t i = 0; i < t->endpoints_cap && k < max; i++) {
		if (t->endpoints[i].used)
			out[k++] = t->endpoints[i];
	}
	return k;
}

/* How statepoll.summarize() ranks an endpoint: max(ports in use, forecast demand), where
 * demand = recent / window * lifetime + other (window 0: no forecast, the rank is the ports
 * in use). The same double operations in the same order as forecast.py, so equal in value. */
static double rank_of(const struct tcpstate_endpoint *e, double window, double lifetime)
{
	double in_use = (double)e->time_wait_recent + e->time_wait_older + e->other;
	if (window <= 0)
		return in_use;
	double demand = (double)e->time_wait_recent / window * lifetime + (double)e->other;
	return demand > in_use ? demand : in_use;
}

/* a before b: higher rank, then family, address, port ascending (summarize()'s order). */
static int ranks_before(const struct tcpstate_endpoint *a, double ra, const struct tcpstate_endpoint *b, double rb)
{
	if (ra != rb)
		return ra > rb;
	if (a->family != b->family)
		return a->family < b->family;
	int c = memcmp(a->addr, b->addr, 16);
	if (c)
		return c < 0;
	return a->port < b->port;
}

/* The n endpoints summarize() would keep, in its order; returns how many were written. */
uint64_t tcpstate_tally_top_endpoints(const struct tcpstate_tally *t, uint64_t n, double window, double lifetime,
				      struct tcpstate_endpoint *out, double *ranks)
{
	uint64_t have = 0;
	if (!n)
		return 0;
	if (t->recent_ms < 0) /* no rate without the recent/older split: demand = other <= in use */
		window = 0;
	for (uint64_t i = 0; i < t->endpoints_cap; i++) {
		const struct tcpstate_endpoint *e = &t->endpoints[i];
		if (!e->used)
			continue;
		double r = rank_of(e, window, lifetime);
		if (have == n && !ranks_before(e, r, &out[n - 1], ranks[n - 1]))
			continue;
		uint64_t j = have < n ? have++ : n - 1;
		while (j > 0 && ranks_before(e, r, &out[j - 1], ranks[j - 1])) {
			out[j] = out[j - 1];
			ranks[j] = ranks[j - 1];
			j--;
		}
		out[j] = *e;
		ranks[j] = r;
	}
	return have;
}

uint64_t tcpstate_tally_sizeof_endpoint(void)
{
	return sizeof(struct tcpstate_endpoint);
}
