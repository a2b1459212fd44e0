/* The heartbeat benchmark's load generator (benchmarks/test_bench_heartbeat.py builds and runs it).
 *
 * Written in C because it shares this machine's two cores with the server it measures: the Python
 * generator it replaces spent about as much CPU per heartbeat as the control plane itself (a
 * resumed TLS session costs CPython an i2d/d2i copy of the session, OpenSSL 3.0's slow key decoder
 * included, and its 16 threads took turns at one lock), so the figure measured both programs.
 * What it sends is what a node sends: each node's own client certificate, its token, the body a
 * node-agent posts, one new TCP + TLS connection per heartbeat resuming the node's last TLS session
 * (the newest ticket the server gave it), as bootstrap.api does, and each node from an address of
 * its own (on loopback, 127.0.0.2 and up), as real nodes are.
 *
 *   heartbeat_load HOST PORT CA_FILE NODES_FILE ROUNDS CLIENTS
 *
 * NODES_FILE: one line per node, "CERT_FILE\tKEY_FILE\tREQUEST_FILE", REQUEST_FILE holding the whole
 * HTTP/1.1 request. First one heartbeat per node, one at a time (its full mTLS handshake, untimed);
 * then ROUNDS heartbeats per node from CLIENTS threads, never two of one node at once. Every answer
 * must be 200 with "status":"active". Between the two it prints "ready" and waits for a line on stdin
 * (the caller samples the server's CPU time there). Then prints, on stdout:
 *   warmup_resumed N / resumed N / wall_s S / cpu_s S / latencies_us L1 L2 ...
 * Any failure: a message on stderr, exit 1.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

struct node {
    SSL_CTX *ctx;
    SSL_SESSION *session; /* the last one the server gave; NULL before the first heartbeat */
    char *request;
    size_t request_len;
    pthread_mutex_t busy;
};

static struct node *nodes;
static size_t node_count;
static struct sockaddr_storage server_addr;
static socklen_t server_addr_len;
static int loopback; /* the server is on 127.0.0.0/8: node i connects from 127.0.0.(2 + i) */
static const char *server_host;
static long *latencies_us;
static size_t work_total, work_next;
static pthread_mutex_t work_lock = PTHREAD_MUTEX_INITIALIZER;
static long resumed;

static void die(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fputs("heartbeat_load: ", stderr);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    unsigned long e;
    while ((e = ERR_get_error()) != 0) {
        char buf[256];
        ERR_error_string_n(e, buf, sizeof buf);
        fprintf(stderr, " [%s]", buf);
    }
    fputc('\n', stderr);
    exit(1);
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static char *read_file(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) die("cannot open %s: %s", path, strerror(errno));
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    rewind(f);
    char *buf = malloc((size_t)n + 1);
    if (!buf || fread(buf, 1, (size_t)n, f) != (size_t)n) die("cannot read %s", path);
    fclose(f);
    buf[n] = '\0';
    *len = (size_t)n;
    return buf;
}

/* One heartbeat of node i: connect, resume its session, send, read the whole answer, keep the new
 * session. Returns 1 when the handshake resumed a session. */
static int beat(size_t i) {
    struct node *n = &nodes[i];
    int fd = socket(server_addr.ss_family, SOCK_STREAM, 0);
    if (fd < 0) die("socket: %s", strerror(errno));
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    struct timeval limit = {30, 0}; /* a server that stops answering fails the run, never hangs it */
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &limit, sizeof limit);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &limit, sizeof limit);
    if (loopback) {
        struct sockaddr_in src = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(0x7f000002u + (uint32_t)i)};
        if (bind(fd, (struct sockaddr *)&src, sizeof src) != 0) die("bind: %s", strerror(errno));
    }
    if (connect(fd, (struct sockaddr *)&server_addr, server_addr_len) != 0)
        die("connect: %s", strerror(errno));
    SSL *ssl = SSL_new(n->ctx);
    if (!ssl) die("SSL_new");
    SSL_set_fd(ssl, fd);
    SSL_set_tlsext_host_name(ssl, server_host);
    if (!SSL_set1_host(ssl, server_host)) die("SSL_set1_host");
    if (n->session) SSL_set_session(ssl, n->session);
    if (SSL_connect(ssl) != 1) die("node %zu: TLS handshake failed", i);
    int reused = SSL_session_reused(ssl);
    if (SSL_write(ssl, n->request, (int)n->request_len) != (int)n->request_len) die("node %zu: write", i);

    char answer[65536];
    size_t got = 0;
    long body_len = -1;
    char *body = NULL;
    for (;;) {
        if (got == sizeof answer - 1) die("node %zu: answer over %zu bytes", i, sizeof answer);
        int r = SSL_read(ssl, answer + got, (int)(sizeof answer - 1 - got));
        if (r <= 0) die("node %zu: connection closed after %zu bytes of the answer", i, got);
        got += (size_t)r;
        answer[got] = '\0';
        if (!body) {
            char *end = strstr(answer, "\r\n\r\n");
            if (!end) continue;
            body = end + 4;
            char *cl = strcasestr(answer, "\r\ncontent-length:");
            if (!cl || cl > end) die("node %zu: answer without Content-Length: %.200s", i, answer);
            body_len = strtol(cl + strlen("\r\ncontent-length:"), NULL, 10);
        }
        if ((long)(answer + got - body) >= body_len) break;
    }
    if (strncmp(answer, "HTTP/1.1 200 ", 13) != 0 || !strstr(body, "\"status\":\"active\""))
        die("node %zu: unexpected answer: %.300s", i, answer);
    /* In TLS 1.3 the ticket comes after the handshake; reading the answer has processed it. */
    SSL_SESSION *s = SSL_get1_session(ssl);
    if (n->session) SSL_SESSION_free(n->session);
    n->session = s;
    /* The server closes the connection after its answer (Connection: close); so does the node, with
     * a close_notify: OpenSSL marks the session of a connection freed without one not resumable. */
    SSL_shutdown(ssl);
    SSL_free(ssl);
    close(fd);
    return reused;
}

static void *client(void *arg) {
    (void)arg;
    for (;;) {
        pthread_mutex_lock(&work_lock);
        size_t k = work_next < work_total ? work_next++ : work_total;
        pthread_mutex_unlock(&work_lock);
        if (k == work_total) return NULL;
        size_t i = k % node_count;
        pthread_mutex_lock(&nodes[i].busy);
        double t0 = now_s();
        int r = beat(i);
        latencies_us[k] = (long)((now_s() - t0) * 1e6);
        pthread_mutex_unlock(&nodes[i].busy);
        __atomic_add_fetch(&resumed, r, __ATOMIC_RELAXED);
    }
}

static double cpu_s(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (double)ru.ru_utime.tv_sec + (double)ru.ru_utime.tv_usec / 1e6 + (double)ru.ru_stime.tv_sec +
           (double)ru.ru_stime.tv_usec / 1e6;
}

int main(int argc, char **argv) {
    if (argc != 7) die("usage: heartbeat_load HOST PORT CA_FILE NODES_FILE ROUNDS CLIENTS");
    signal(SIGPIPE, SIG_IGN); /* a connection the server closed is an error message, not a death */
    server_host = argv[1];
    const char *ca_file = argv[3];
    long rounds = strtol(argv[5], NULL, 10), clients = strtol(argv[6], NULL, 10);
    if (rounds < 1 || clients < 1) die("ROUNDS and CLIENTS must be positive");

    struct sockaddr_in *a4 = (struct sockaddr_in *)&server_addr;
    struct sockaddr_in6 *a6 = (struct sockaddr_in6 *)&server_addr;
    int port = (int)strtol(argv[2], NULL, 10);
    if (inet_pton(AF_INET, server_host, &a4->sin_addr) == 1) {
        a4->sin_family = AF_INET;
        a4->sin_port = htons((uint16_t)port);
        server_addr_len = sizeof *a4;
        loopback = (ntohl(a4->sin_addr.s_addr) >> 24) == 127;
    } else if (inet_pton(AF_INET6, server_host, &a6->sin6_addr) == 1) {
        a6->sin6_family = AF_INET6;
        a6->sin6_port = htons((uint16_t)port);
        server_addr_len = sizeof *a6;
    } else {
        die("HOST must be an IP address: %s", server_host);
    }

    size_t len;
    char *list = read_file(argv[4], &len);
    for (char *p = list; *p; p++) node_count += *p == '\n';
    if (node_count == 0) die("no nodes in %s", argv[4]);
    nodes = calloc(node_count, sizeof *nodes);
    char *save = NULL;
    size_t i = 0;
    for (char *line = strtok_r(list, "\n", &save); line && i < node_count; line = strtok_r(NULL, "\n", &save), i++) {
        char *cert = strtok(line, "\t"), *key = strtok(NULL, "\t"), *req = strtok(NULL, "\t");
        if (!cert || !key || !req) die("line %zu of %s: want CERT\\tKEY\\tREQUEST", i + 1, argv[4]);
        SSL_CTX *ctx = SSL_CTX_new(TLS_client_method());
        if (!ctx) die("SSL_CTX_new");
        SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
        SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, NULL);
        if (SSL_CTX_load_verify_locations(ctx, ca_file, NULL) != 1) die("cannot load %s", ca_file);
        if (SSL_CTX_use_certificate_chain_file(ctx, cert) != 1) die("cannot load %s", cert);
        if (SSL_CTX_use_PrivateKey_file(ctx, key, SSL_FILETYPE_PEM) != 1) die("cannot load %s", key);
        nodes[i].ctx = ctx;
        nodes[i].request = read_file(req, &nodes[i].request_len);
        pthread_mutex_init(&nodes[i].busy, NULL);
    }
    node_count = i;
    if (loopback && node_count > 0xfffff0) die("too many nodes for 127.0.0.0/8");

    long warm = 0;
    for (i = 0; i < node_count; i++) warm += beat(i);
    /* The caller samples the server's CPU time between the warm-up and the timed heartbeats. */
    printf("ready\n");
    fflush(stdout);
    char go[16];
    if (!fgets(go, sizeof go, stdin)) die("stdin closed before the go");

    work_total = (size_t)rounds * node_count;
    latencies_us = calloc(work_total, sizeof *latencies_us);
    pthread_t *threads = calloc((size_t)clients, sizeof *threads);
    double cpu0 = cpu_s(), t0 = now_s();
    for (long c = 0; c < clients; c++)
        if (pthread_create(&threads[c], NULL, client, NULL) != 0) die("pthread_create");
    for (long c = 0; c < clients; c++) pthread_join(threads[c], NULL);
    double wall = now_s() - t0, cpu = cpu_s() - cpu0;

    printf("warmup_resumed %ld\nresumed %ld\nwall_s %.6f\ncpu_s %.6f\nlatencies_us", warm, resumed, wall, cpu);
    for (size_t k = 0; k < work_total; k++) printf(" %ld", latencies_us[k]);
    putchar('\n');
    return 0;
}
