/*
 * c-embed: a C program that embeds ferry. It owns 64 MiB of "guest" memory, forks, and migrates
 * that memory post-copy from the child (source) to the parent (destination) over TCP loopback.
 * The parent resumes its "guest" at once and reads every byte while pages arrive, so most reads
 * fault and are served by ferry; it checks every byte against the source's pattern. Pages the
 * source reports free hold junk there and must read as zero here.
 *
 *   ./migrate [anon|memfd] [tcp|unix|rdma[:DEVICE]]     exit 0 and "c-embed: PASS" on success
 *
 * With "unix" the two processes use ferry's local transport: the source's memory is a memfd the
 * destination maps, so its reads cost the source nothing. With "rdma" (a libferry built with the
 * rdma feature and an RDMA device) the destination reads the source's memory with RDMA READs.
 */
#define _GNU_SOURCE
#include <ferry.h>

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#define MEM (64ull << 20)
#define PAGE 4096u
#define PAGES (MEM / PAGE)
#define WORDS_PER_PAGE (PAGE / 8)
#define FREE_FIRST 4096u
#define FREE_COUNT 1024u

static const uint8_t KEY[32] = {'c', '-', 'e', 'm', 'b', 'e', 'd', ' ', 'k', 'e', 'y', ' ', '0', '1', '2', '3',
                                '4', '5', '6', '7', '8', '9', 'a', 'b', 'c', 'd', 'e', 'f', 'g', 'h', 'i', 'j'};
static const char STATE[] = "vcpu and device state from the source";

static uint64_t expected(uint64_t page, uint64_t word) {
    return ((page * 0x9e3779b97f4a7c15ull) ^ (word * 0xbf58476d1ce4e5b9ull)) | 1;
}

static int is_free(uint64_t page) { return page >= FREE_FIRST && page < FREE_FIRST + FREE_COUNT; }

static int fail(const char *what, FerryStatus status) {
    fprintf(stderr, "c-embed: %s: status %d: %s\n", what, (int)status, ferry_last_error());
    return 1;
}

static char unix_addr[64]; /* "unix:PATH" when the local transport is used */
static const char *rdma_device; /* set ("" for the first device) when the rdma transport is used */

static int source(int port_pipe) {
    int fd = -1;
    uint64_t *mem;
    if (unix_addr[0]) {
        fd = memfd_create("c-embed-source", MFD_CLOEXEC | MFD_ALLOW_SEALING);
        if (fd < 0 || ftruncate(fd, MEM) != 0) return 1;
        /* The destination maps this memory: seal its size so it can never shrink under it. */
        if (fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW) != 0) return 1;
        mem = mmap(NULL, MEM, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    } else {
        mem = mmap(NULL, MEM, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    }
    if (mem == MAP_FAILED) return 1;
    for (uint64_t p = 0; p < PAGES; p++) {
        if (is_free(p)) {
            memset(&mem[p * WORDS_PER_PAGE], 0xEE, PAGE);
            continue;
        }
        for (uint64_t w = 0; w < WORDS_PER_PAGE; w++) mem[p * WORDS_PER_PAGE + w] = expected(p, w);
    }
    FerryRegion region = {.guest_phys_addr = 0, .host_addr = mem, .size = MEM, .fd = fd};
    FerrySource *src = NULL;
    char listen[96] = "127.0.0.1:0";
    if (unix_addr[0])
        snprintf(listen, sizeof listen, "%s", unix_addr);
    else if (rdma_device)
        snprintf(listen, sizeof listen, "rdma:127.0.0.1:0%s%s", rdma_device[0] ? "#" : "", rdma_device);
    FerryStatus st = ferry_source_start(&region, 1, PAGE, listen, KEY, sizeof KEY, &src);
    if (st != FERRY_STATUS_OK) return fail("ferry_source_start", st);
    uint16_t port = 0;
    if (!unix_addr[0] && (st = ferry_source_port(src, &port)) != FERRY_STATUS_OK) return fail("ferry_source_port", st);
    if (write(port_pipe, &port, sizeof port) != sizeof port) return 1;
    close(port_pipe);

    static uint64_t free_bits[PAGES / 64];
    for (uint64_t p = FREE_FIRST; p < FREE_FIRST + FREE_COUNT; p++) free_bits[p / 64] |= 1ull << (p % 64);
    /* Wait for the destination before pausing, so the downtime is only the handoff itself. */
    if ((st = ferry_source_wait_destination(src, 10000)) != FERRY_STATUS_OK) return fail("ferry_source_wait_destination", st);
    /* A VMM pauses its vCPUs here; the handoff returns once the destination holds every page. */
    FerryStats stats;
    st = ferry_source_handoff(src, (const uint8_t *)STATE, sizeof STATE, free_bits, PAGES / 64, 10000, &stats);
    if (st != FERRY_STATUS_OK) return fail("ferry_source_handoff", st);
    printf("source: downtime %llu us, total %llu us, pages sent twice %llu\n", (unsigned long long)stats.downtime_us,
           (unsigned long long)stats.total_us, (unsigned long long)stats.pages_sent_twice);
    /* The guest is handed over once: a second handoff (another destination) would resume a copy. */
    st = ferry_source_handoff(src, (const uint8_t *)STATE, sizeof STATE, NULL, 0, 100, NULL);
    if (st != FERRY_STATUS_ERR_STATE) {
        fprintf(stderr, "c-embed: a second handoff returned %d, not FERRY_STATUS_ERR_STATE\n", (int)st);
        return 1;
    }
    ferry_source_free(src);
    fflush(stdout); /* the child leaves through _exit, which does not flush */
    return stats.pages_sent_twice != 0;
}

static int32_t resume(const uint8_t *state, size_t len, void *user) {
    if (len != sizeof STATE || memcmp(state, STATE, len) != 0) return -1;
    *(int *)user = 1; /* a VMM loads the state and starts its vCPUs here */
    return 0;
}

static int destination(uint16_t port, int use_memfd) {
    int fd = -1;
    uint64_t *mem;
    if (use_memfd) {
        fd = memfd_create("c-embed-guest", MFD_CLOEXEC);
        if (fd < 0 || ftruncate(fd, MEM) != 0) return 1;
        mem = mmap(NULL, MEM, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    } else {
        mem = mmap(NULL, MEM, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    }
    if (mem == MAP_FAILED) return 1;
    FerryRegion region = {.guest_phys_addr = 0, .host_addr = mem, .size = MEM, .fd = fd};
    char addr[96];
    if (unix_addr[0])
        snprintf(addr, sizeof addr, "%s", unix_addr);
    else if (rdma_device)
        snprintf(addr, sizeof addr, "rdma:127.0.0.1:%u%s%s", port, rdma_device[0] ? "#" : "", rdma_device);
    else
        snprintf(addr, sizeof addr, "127.0.0.1:%u", port);
    FerryDestination *dst = NULL;
    FerryStatus st = ferry_destination_connect(&region, 1, PAGE, addr, KEY, sizeof KEY, FERRY_PREPAGER_BUBBLING, &dst);
    if (st != FERRY_STATUS_OK) return fail("ferry_destination_connect", st);
    int resumed = 0;
    if ((st = ferry_destination_start(dst, resume, &resumed)) != FERRY_STATUS_OK) return fail("ferry_destination_start", st);

    /* The guest runs: every byte it reads is checked, most of them fault and ferry brings them. */
    uint64_t bad = 0;
    for (uint64_t p = 0; p < PAGES; p++)
        for (uint64_t w = 0; w < WORDS_PER_PAGE; w++)
            if (mem[p * WORDS_PER_PAGE + w] != (is_free(p) ? 0 : expected(p, w))) bad++;

    FerryStats stats;
    if ((st = ferry_destination_wait(dst, &stats)) != FERRY_STATUS_OK) return fail("ferry_destination_wait", st);
    printf("destination: %llu pages, %llu network faults, %llu bulk pages, %llu free pages skipped, fault p50 %llu us, "
           "total %llu us, %llu words wrong\n",
           (unsigned long long)stats.pages_total, (unsigned long long)stats.network_faults,
           (unsigned long long)stats.bulk_pages, (unsigned long long)stats.skipped_free_pages,
           (unsigned long long)stats.fault_p50_us, (unsigned long long)stats.total_us, (unsigned long long)bad);
    ferry_destination_free(dst);
    return bad != 0 || !resumed || stats.pages_sent_twice != 0 || stats.skipped_free_pages != FREE_COUNT;
}

int main(int argc, char **argv) {
    int use_memfd = argc > 1 && strcmp(argv[1], "memfd") == 0;
    if (argc > 2 && strcmp(argv[2], "unix") == 0)
        snprintf(unix_addr, sizeof unix_addr, "unix:/tmp/ferry-c-embed-%d.sock", (int)getpid());
    if (argc > 2 && strncmp(argv[2], "rdma", 4) == 0)
        rdma_device = argv[2][4] == ':' ? argv[2] + 5 : "";
    if (ferry_abi_version() != FERRY_ABI_VERSION) {
        fprintf(stderr, "c-embed: library ABI %u, header ABI %u\n", ferry_abi_version(), FERRY_ABI_VERSION);
        return 1;
    }
    int pipefd[2];
    if (pipe(pipefd) != 0) return 1;
    fflush(stdout);
    pid_t child = fork();
    if (child < 0) return 1;
    if (child == 0) {
        close(pipefd[0]);
        _exit(source(pipefd[1]));
    }
    close(pipefd[1]);
    uint16_t port = 0;
    int rc = read(pipefd[0], &port, sizeof port) == sizeof port ? destination(port, use_memfd) : 1;
    int status = 0;
    waitpid(child, &status, 0);
    rc |= !WIFEXITED(status) || WEXITSTATUS(status) != 0;
    printf("c-embed: %s\n", rc ? "FAIL" : "PASS");
    return rc;
}
