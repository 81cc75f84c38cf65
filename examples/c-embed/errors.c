/*
 * The error paths of ferry's C ABI: bad arguments, a wrong key, another layout, calls out of
 * order, a peer that vanishes. Each must return the documented status with a message, never
 * crash or hang. Prints "N passed, M failed".
 */
#define _GNU_SOURCE
#include <ferry.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#define PAGE 4096u
#define MEM (4ull << 20)

static int passed, failed;
static const uint8_t KEY_A[32] = "key A for the C error path test";
static const uint8_t KEY_B[32] = "key B for the C error path test";

static void expect(const char *what, FerryStatus got, FerryStatus want) {
    int ok = got == want && (want == FERRY_STATUS_OK || strlen(ferry_last_error()) > 0);
    if (ok) {
        passed++;
    } else {
        failed++;
        fprintf(stderr, "FAIL %s: status %d, expected %d (%s)\n", what, (int)got, (int)want, ferry_last_error());
    }
}

static FerryRegion fresh_region(uint64_t size) {
    void *mem = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    FerryRegion r = {.guest_phys_addr = 0, .host_addr = mem, .size = size, .fd = -1};
    return r;
}

static uint16_t closed_port(void) {
    int s = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof a;
    bind(s, (struct sockaddr *)&a, sizeof a);
    getsockname(s, (struct sockaddr *)&a, &len);
    close(s);
    return ntohs(a.sin_port);
}

static int32_t accept_resume(const uint8_t *state, size_t len, void *user) {
    (void)state, (void)len, (void)user;
    return 0;
}

static int32_t refuse_resume(const uint8_t *state, size_t len, void *user) {
    (void)state, (void)len, (void)user;
    return -1;
}

static int32_t count_resume(const uint8_t *state, size_t len, void *user) {
    (void)state, (void)len;
    ++*(int *)user;
    return 0;
}

static void *cancel_soon(void *source) {
    usleep(100 * 1000);
    ferry_source_cancel(source);
    return NULL;
}

int main(void) {
    char addr[32];
    FerrySource *src = NULL;
    FerryDestination *dst = NULL;
    FerryRegion region = fresh_region(MEM);

    if (ferry_abi_version() == FERRY_ABI_VERSION) passed++; else failed++;
    expect("null regions", ferry_source_start(NULL, 0, PAGE, "127.0.0.1:0", KEY_A, 32, &src), FERRY_STATUS_ERR_INVALID_ARGUMENT);
    expect("null out", ferry_source_start(&region, 1, PAGE, "127.0.0.1:0", KEY_A, 32, NULL), FERRY_STATUS_ERR_INVALID_ARGUMENT);
    expect("short key", ferry_source_start(&region, 1, PAGE, "127.0.0.1:0", KEY_A, 8, &src), FERRY_STATUS_ERR_INVALID_ARGUMENT);
    expect("bad page size", ferry_source_start(&region, 1, 1234, "127.0.0.1:0", KEY_A, 32, &src), FERRY_STATUS_ERR_INVALID_ARGUMENT);
    FerryRegion unaligned = region;
    unaligned.host_addr = (char *)region.host_addr + 8;
    expect("unaligned host address", ferry_source_start(&unaligned, 1, PAGE, "127.0.0.1:0", KEY_A, 32, &src), FERRY_STATUS_ERR_INVALID_ARGUMENT);
    expect("bad address", ferry_source_start(&region, 1, PAGE, "not an address", KEY_A, 32, &src), FERRY_STATUS_ERR_IO);
    expect("null source", ferry_source_port(NULL, NULL), FERRY_STATUS_ERR_INVALID_ARGUMENT);
    ferry_source_free(NULL);
    ferry_destination_free(NULL);

    snprintf(addr, sizeof addr, "127.0.0.1:%u", closed_port());
    FerryRegion d1 = fresh_region(MEM);
    expect("nobody listening", ferry_destination_connect(&d1, 1, PAGE, addr, KEY_A, 32, FERRY_PREPAGER_BUBBLING, &dst), FERRY_STATUS_ERR_IO);
    expect("unknown pre-pager", ferry_destination_connect(&d1, 1, PAGE, addr, KEY_A, 32, 7, &dst), FERRY_STATUS_ERR_INVALID_ARGUMENT);

    /* A source in this process, for the refusals. */
    expect("source start", ferry_source_start(&region, 1, PAGE, "127.0.0.1:0", KEY_A, 32, &src), FERRY_STATUS_OK);
    uint16_t port = 0;
    expect("source port", ferry_source_port(src, &port), FERRY_STATUS_OK);
    snprintf(addr, sizeof addr, "127.0.0.1:%u", port);
    expect("wrong key", ferry_destination_connect(&d1, 1, PAGE, addr, KEY_B, 32, FERRY_PREPAGER_BUBBLING, &dst), FERRY_STATUS_ERR_AUTH);
    FerryRegion bigger = fresh_region(2 * MEM);
    expect("other layout", ferry_destination_connect(&bigger, 1, PAGE, addr, KEY_A, 32, FERRY_PREPAGER_BUBBLING, &dst), FERRY_STATUS_ERR_LAYOUT);
    expect("handoff with nobody", ferry_source_handoff(src, NULL, 0, NULL, 0, 100, NULL), FERRY_STATUS_ERR_IO);
    uint64_t too_short[1] = {0};
    expect("free bitmap of the wrong size", ferry_source_handoff(src, NULL, 0, too_short, 1, 100, NULL), FERRY_STATUS_ERR_INVALID_ARGUMENT);
    ferry_source_free(src);

    /* A source that vanishes after the destination connected, before handing over. */
    int go[2], port_pipe[2];
    if (pipe(go) != 0 || pipe(port_pipe) != 0) return 1;
    fflush(stdout);
    pid_t child = fork();
    if (child == 0) {
        FerrySource *s = NULL;
        FerryRegion r = fresh_region(MEM);
        if (ferry_source_start(&r, 1, PAGE, "127.0.0.1:0", KEY_A, 32, &s) != FERRY_STATUS_OK) _exit(1);
        uint16_t p = 0;
        ferry_source_port(s, &p);
        if (write(port_pipe[1], &p, sizeof p) != sizeof p) _exit(1);
        char c;
        if (read(go[0], &c, 1) != 1) _exit(1);
        _exit(0); /* gone: no handoff, sockets closed by the kernel */
    }
    if (read(port_pipe[0], &port, sizeof port) != sizeof port) return 1;
    snprintf(addr, sizeof addr, "127.0.0.1:%u", port);
    FerryRegion d2 = fresh_region(MEM);
    expect("connect to the doomed source", ferry_destination_connect(&d2, 1, PAGE, addr, KEY_A, 32, FERRY_PREPAGER_BUBBLING, &dst), FERRY_STATUS_OK);
    expect("wait before start", ferry_destination_wait(dst, NULL), FERRY_STATUS_ERR_STATE);
    expect("finish before start", ferry_destination_finish(dst), FERRY_STATUS_ERR_STATE);
    if (write(go[1], "x", 1) != 1) return 1;
    waitpid(child, NULL, 0);
    expect("source vanished before handoff", ferry_destination_start(dst, NULL, NULL), FERRY_STATUS_ERR_INVALID_ARGUMENT);
    FerryStatus st = ferry_destination_start(dst, refuse_resume, NULL);
    expect("source vanished before handoff", st, FERRY_STATUS_ERR_PEER);
    expect("cancel before start", ferry_destination_cancel(dst), FERRY_STATUS_ERR_STATE);
    ferry_destination_free(dst);
    expect("cancel null", ferry_destination_cancel(NULL), FERRY_STATUS_ERR_INVALID_ARGUMENT);

    /* A destination cancelled after its guest resumed: wait reports the pages still missing, and
       the source's handoff hears that the destination gave up. */
    if (pipe(port_pipe) != 0) return 1;
    fflush(stdout);
    child = fork();
    if (child == 0) {
        FerrySource *s = NULL;
        FerryRegion r = fresh_region(MEM);
        if (ferry_source_start(&r, 1, PAGE, "127.0.0.1:0", KEY_A, 32, &s) != FERRY_STATUS_OK) _exit(1);
        uint16_t p = 0;
        ferry_source_port(s, &p);
        if (write(port_pipe[1], &p, sizeof p) != sizeof p) _exit(1);
        _exit(ferry_source_handoff(s, NULL, 0, NULL, 0, 10000, NULL) == FERRY_STATUS_ERR_PEER ? 0 : 1);
    }
    if (read(port_pipe[0], &port, sizeof port) != sizeof port) return 1;
    snprintf(addr, sizeof addr, "127.0.0.1:%u", port);
    FerryRegion d3 = fresh_region(MEM);
    expect("connect", ferry_destination_connect(&d3, 1, PAGE, addr, KEY_A, 32, FERRY_PREPAGER_DEMAND, &dst), FERRY_STATUS_OK);
    expect("start", ferry_destination_start(dst, accept_resume, NULL), FERRY_STATUS_OK);
    expect("cancel", ferry_destination_cancel(dst), FERRY_STATUS_OK);
    expect("wait after cancel", ferry_destination_wait(dst, NULL), FERRY_STATUS_ERR_PEER);
    int status = 0;
    waitpid(child, &status, 0);
    if (WIFEXITED(status) && WEXITSTATUS(status) == 0) {
        passed++;
    } else {
        failed++;
        fprintf(stderr, "FAIL the source was not told the destination cancelled\n");
    }
    ferry_destination_free(dst);

    /* unix: maps the guest memory in the destination: a region without an fd is the caller's
       mistake, said before anything starts. */
    expect("unix: with a region without an fd", ferry_source_start(&region, 1, PAGE, "unix:/tmp/ferry-errors-nofd.sock", KEY_A, 32, &src), FERRY_STATUS_ERR_INVALID_ARGUMENT);

    /* Cancel while a handoff waits for a destination: it returns at once with ERR_PEER (not after
       its own minute), and the source hands nothing over afterwards. */
    expect("source start", ferry_source_start(&region, 1, PAGE, "127.0.0.1:0", KEY_A, 32, &src), FERRY_STATUS_OK);
    pthread_t canceller;
    pthread_create(&canceller, NULL, cancel_soon, src);
    expect("handoff cancelled while waiting for a destination", ferry_source_handoff(src, NULL, 0, NULL, 0, 60000, NULL), FERRY_STATUS_ERR_PEER);
    pthread_join(canceller, NULL);
    expect("handoff after cancel", ferry_source_handoff(src, NULL, 0, NULL, 0, 100, NULL), FERRY_STATUS_ERR_PEER);
    ferry_source_free(src);

    /* Cancel after a destination connected, before the handoff: the destination never resumes. */
    expect("source start", ferry_source_start(&region, 1, PAGE, "127.0.0.1:0", KEY_A, 32, &src), FERRY_STATUS_OK);
    expect("source port", ferry_source_port(src, &port), FERRY_STATUS_OK);
    snprintf(addr, sizeof addr, "127.0.0.1:%u", port);
    FerryRegion d4 = fresh_region(MEM);
    expect("connect", ferry_destination_connect(&d4, 1, PAGE, addr, KEY_A, 32, FERRY_PREPAGER_BUBBLING, &dst), FERRY_STATUS_OK);
    expect("the source sees the destination", ferry_source_wait_destination(src, 10000), FERRY_STATUS_OK);
    expect("cancel the source", ferry_source_cancel(src), FERRY_STATUS_OK);
    int resumed = 0;
    expect("start after the source cancelled", ferry_destination_start(dst, count_resume, &resumed), FERRY_STATUS_ERR_PEER);
    if (resumed == 0) {
        passed++;
    } else {
        failed++;
        fprintf(stderr, "FAIL the destination resumed a guest its cancelled source never handed over\n");
    }
    expect("handoff after cancel", ferry_source_handoff(src, NULL, 0, NULL, 0, 100, NULL), FERRY_STATUS_ERR_PEER);
    ferry_destination_free(dst);
    ferry_source_free(src);

    printf("%d passed, %d failed\n", passed, failed);
    return failed != 0;
}
