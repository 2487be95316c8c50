/* churn.c: short-lived TCP connection load (client closes first), bounded by time and count. */
/*
 * churn server ADDR PORT THREADS
 *     accept, read until the peer's FIN, close; runs until killed.
 * churn client ADDR PORT SECONDS MAX_CONNECTIONS THREADS
 *     connect and close as fast as possible until SECONDS pass or MAX_CONNECTIONS are made;
 *     prints: made=N failed=N seconds=S rate=R
 * Each connection is 10 state transitions (5 per end) on the kernel's tracepoints.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static struct sockaddr_storage addr;
static socklen_t addr_len;
static int listen_fd;
static double deadline;
static long max_conns;
static atomic_long made, failed, claimed;

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

static void *client(void *arg)
{
	(void)arg;
	while (now() < deadline) {
		if (atomic_fetch_add(&claimed, 1) >= max_conns)
			break;
		int fd = socket(addr.ss_family, SOCK_STREAM, 0);
		if (fd < 0) {
			atomic_fetch_add(&failed, 1);
			continue;
		}
		if (connect(fd, (struct sockaddr *)&addr, addr_len) == 0)
			atomic_fetch_add(&made, 1);
		else
			atomic_fetch_add(&failed, 1);
		close(fd);
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
	if (argc == 7 && strcmp(argv[1], "client") == 0) {
		parse_addr(argv[2], argv[3]);
		double seconds = atof(argv[4]);
		if (seconds <= 0 || seconds > 600) {
			fprintf(stderr, "churn: SECONDS must be in (0, 600]\n");
			return 2;
		}
		max_conns = atol(argv[5]);
		double start = now();
		deadline = start + seconds;
		run_threads(client, atoi(argv[6]));
		double took = now() - start;
		printf("made=%ld failed=%ld seconds=%.3f rate=%.0f\n", (long)made, (long)failed, took, made / took);
		return 0;
	}
	fprintf(stderr, "usage: churn server ADDR PORT THREADS | churn client ADDR PORT SECONDS MAX THREADS\n");
	return 2;
}
