/* churn.c: short-lived TCP connection load (client closes first), bounded by time and count. */
/*
 * churn server ADDR PORT THREADS
 *     accept, read until the peer's FIN, close; runs until killed.
 * churn client ADDR PORT SECONDS MAX_CONNECTIONS THREADS [RATE]
 *     connect and close as fast as possible until SECONDS pass or MAX_CONNECTIONS are made;
 *     with RATE > 0, start RATE connections/s in all, evenly paced, instead;
 *     prints: made=N failed=N seconds=S rate=R
 * churn clean-client ADDR PORT SECONDS MAX_CONNECTIONS THREADS [RATE]
 *     the same, but each connection is shut down for writing and kept until the server's
 *     FIN has arrived, then closed: no reset even where TIME_WAIT sockets cannot be kept.
 * churn epoll-server ADDR PORT THREADS
 *     the server's service with one SO_REUSEPORT listener and one epoll loop per thread;
 *     prints "listening" once every listener is bound; runs until killed.
 * Each connection is 10 state transitions (5 per end) on the kernel's tracepoints.
 * Why a blocking client but an epoll server: between namespaces on one host the whole
 * handshake runs in the connecting thread's softirq, so a blocking connect() returns
 * established without sleeping (an epoll client only adds syscalls: measured slower). The
 * threaded server sleeps and wakes per connection, and this VM's wakeups are expensive.
 */
#define _GNU_SOURCE /* accept4 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static struct sockaddr_storage addr;
static socklen_t addr_len;
static int listen_fd;
static double deadline;
static long max_conns;
static atomic_long made, failed, claimed;
static double rate_per_thread;
static int listen_fds[64];

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void parse_addr(const char *host, const char *port)
{
	struct sockaddr_in *in4 = (struct sockaddr_in *)&addr;
	struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)&addr;
	memset(&addr, 0, sizeof(addr));
	if (inet_pton(AF_INET, host, &in4->sin_addr) == 1) {
		in4->sin_family = AF_INET;
		in4->sin_port = htons(atoi(port));
		addr_len = sizeof(*in4);
	} else if (inet_pton(AF_INET6, host, &in6->sin6_addr) == 1) {
		in6->sin6_family = AF_INET6;
		in6->sin6_port = htons(atoi(port));
		addr_len = sizeof(*in6);
	} else {
		fprintf(stderr, "churn: bad address %s\n", host);
		exit(2);
	}
}

static void *serve(void *arg)
{
	char buf[256];
	(void)arg;
	for (;;) {
		int fd = accept(listen_fd, NULL, NULL);
		if (fd < 0) {
			if (errno == EINTR || errno == ECONNABORTED || errno == EMFILE)
				continue;
			return NULL;
		}
		while (read(fd, buf, sizeof(buf)) > 0)
			;
		close(fd);
	}
}

static void sleep_until(double t)
{
	struct timespec ts = {.tv_sec = (time_t)t, .tv_nsec = (long)((t - (time_t)t) * 1e9)};
	while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR)
		;
}

/* Waits for this thread's next start on the rate's schedule (if paced) and claims one connection
 * of the budget; 0 once the time or the budget is spent. */
static int next_connection(double start, long *started)
{
	if (rate_per_thread > 0) {
		/* On a schedule, not after a gap: a late start does not push back the rest. */
		double due = start + (*started)++ / rate_per_thread;
		if (due >= deadline)
			return 0;
		if (due > now())
			sleep_until(due);
	}
	return atomic_fetch_add(&claimed, 1) < max_conns;
}

/* A socket connected to the server, counted as made; -1 (counted as failed) if that did not work. */
static int connect_one(void)
{
	int fd = socket(addr.ss_family, SOCK_STREAM, 0);
	if (fd < 0) {
		atomic_fetch_add(&failed, 1);
		return -1;
	}
	if (connect(fd, (struct sockaddr *)&addr, addr_len) != 0) {
		atomic_fetch_add(&failed, 1);
		close(fd);
		return -1;
	}
	atomic_fetch_add(&made, 1);
	return fd;
}

static void *client(void *arg)
{
	double start = now();
	long started = 0;
	(void)arg;
	while (now() < deadline) {
		if (!next_connection(start, &started))
			break;
		int fd = connect_one();
		if (fd >= 0)
			close(fd);
	}
	return NULL;
}

/*
 * Like client(), but the socket is kept after shutdown(SHUT_WR) until the server's FIN is in:
 * a socket closed at once is orphaned, and one orphaned in FIN_WAIT2 becomes a timewait
 * mini-socket; where there is no room for one (net.ipv4.tcp_max_tw_buckets full, or 0) the
 * kernel drops it and answers the server's FIN with a reset. Kept open, it acknowledges that FIN.
 * The last 64 sockets wait in a ring: by the time one comes round, its FIN is nearly always in.
 */
static void *clean_client(void *arg)
{
	int ring[64], head = 0;
	char buf[64];
	double start = now();
	long started = 0;
	(void)arg;
	memset(ring, -1, sizeof(ring));
	while (now() < deadline) {
		if (!next_connection(start, &started))
			break;
		int fd = connect_one();
		if (fd < 0)
			continue;
		shutdown(fd, SHUT_WR);
		if (ring[head] >= 0) {
			while (read(ring[head], buf, sizeof(buf)) > 0)
				;
			close(ring[head]);
		}
		ring[head] = fd;
		head = (head + 1) % 64;
	}
	for (int i = 0; i < 64; i++)
		if (ring[i] >= 0) {
			while (read(ring[i], buf, sizeof(buf)) > 0)
				;
			close(ring[i]);
		}
	return NULL;
}

/* One listener per thread (SO_REUSEPORT): the kernel spreads the SYNs, no thundering herd. */
static void *epoll_serve(void *arg)
{
	int lfd = *(int *)arg, ep = epoll_create1(0);
	struct epoll_event ev = {.events = EPOLLIN, .data.fd = lfd}, evs[256];
	char buf[256];
	epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &ev);
	for (;;) {
		int n = epoll_wait(ep, evs, 256, -1);
		for (int i = 0; i < n; i++) {
			int fd = evs[i].data.fd;
			if (fd == lfd) {
				int c;
				while ((c = accept4(lfd, NULL, NULL, SOCK_NONBLOCK)) >= 0) {
					/* The client closes right after connecting: its FIN is often here already. */
					ssize_t r;
					while ((r = read(c, buf, sizeof(buf))) > 0)
						;
					if (r == 0 || errno != EAGAIN) {
						close(c);
						continue;
					}
					struct epoll_event cev = {.events = EPOLLIN | EPOLLRDHUP, .data.fd = c};
					epoll_ctl(ep, EPOLL_CTL_ADD, c, &cev);
				}
				continue;
			}
			ssize_t r;
			while ((r = read(fd, buf, sizeof(buf))) > 0)
				;
			if (r == 0 || errno != EAGAIN)
				close(fd); /* closing removes it from the epoll set */
		}
	}
	return NULL;
}

static void run_threads(void *(*fn)(void *), int n)
{
	pthread_t t[64];
	if (n < 1 || n > 64)
		n = 1;
	for (int i = 0; i < n; i++)
		pthread_create(&t[i], NULL, fn, NULL);
	for (int i = 0; i < n; i++)
		pthread_join(t[i], NULL);
}

int main(int argc, char **argv)
{
	if (argc == 5 && strcmp(argv[1], "server") == 0) {
		parse_addr(argv[2], argv[3]);
		int one = 1;
		listen_fd = socket(addr.ss_family, SOCK_STREAM, 0);
		setsockopt(listen_fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
		if (bind(listen_fd, (struct sockaddr *)&addr, addr_len) != 0 || listen(listen_fd, 4096) != 0) {
			perror("churn: bind/listen");
			return 1;
		}
		printf("listening\n");
		fflush(stdout);
		run_threads(serve, atoi(argv[4]));
		return 0;
	}
	if (argc == 5 && strcmp(argv[1], "epoll-server") == 0) {
		parse_addr(argv[2], argv[3]);
		int n = atoi(argv[4]), one = 1;
		pthread_t t[64];
		if (n < 1 || n > 64)
			n = 1;
		for (int i = 0; i < n; i++) {
			int fd = socket(addr.ss_family, SOCK_STREAM | SOCK_NONBLOCK, 0);
			setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
			setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof(one));
			if (bind(fd, (struct sockaddr *)&addr, addr_len) != 0 || listen(fd, 4096) != 0) {
				perror("churn: bind/listen");
				return 1;
			}
			listen_fds[i] = fd;
		}
		printf("listening\n");
		fflush(stdout);
		for (int i = 0; i < n; i++)
			pthread_create(&t[i], NULL, epoll_serve, &listen_fds[i]);
		for (int i = 0; i < n; i++)
			pthread_join(t[i], NULL);
		return 0;
	}
	int clean = argc >= 2 && strcmp(argv[1], "clean-client") == 0;
	if ((argc == 7 || argc == 8) && (strcmp(argv[1], "client") == 0 || clean)) {
		parse_addr(argv[2], argv[3]);
		double seconds = atof(argv[4]), rate = argc == 8 ? atof(argv[7]) : 0;
		int threads = atoi(argv[6]);
		if (seconds <= 0 || seconds > 600) {
			fprintf(stderr, "churn: SECONDS must be in (0, 600]\n");
			return 2;
		}
		if (rate < 0) {
			fprintf(stderr, "churn: RATE must be >= 0\n");
			return 2;
		}
		max_conns = atol(argv[5]);
		rate_per_thread = rate / (threads < 1 || threads > 64 ? 1 : threads);
		double start = now();
		deadline = start + seconds;
		run_threads(clean ? clean_client : client, atoi(argv[6]));
		double took = now() - start;
		printf("made=%ld failed=%ld seconds=%.3f rate=%.0f\n", (long)made, (long)failed, took, made / took);
		return 0;
	}
	fprintf(stderr, "usage: churn server ADDR PORT THREADS | churn epoll-server ADDR PORT THREADS\n"
			"       churn client|clean-client ADDR PORT SECONDS MAX THREADS [RATE]\n");
	return 2;
}
