/*
 * Pre-copy through ferry's C ABI: the child process (source) runs a "guest" thread that keeps
 * writing pages of 32 MiB while ferry moves them in rounds; the dirty-log callback hands ferry the
 * pages written since the last round; the pause callback stops the writer and puts a checksum of
 * the whole memory in the state blob. The parent (destination) receives the rounds and, in its
 * resume callback, checks that its memory has exactly that checksum.
 *
 *   ./precopy     exit 0 and "c-precopy: PASS" on success
 */
#define _GNU_SOURCE
#include <ferry.h>

#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#define MEM (32ull << 20)
#define PAGE 4096u
#define PAGES (MEM / PAGE)

static const uint8_t KEY[32] = "c-embed pre-copy test key 32 by";
static uint64_t *mem;
static _Atomic uint64_t dirty[PAGES / 64];
static atomic_int stop_writer;
static pthread_t writer;
static uint64_t state[2]; /* checksum, writes */

static uint64_t checksum(const uint64_t *m) {
    uint64_t h = 1469598103934665603ull;
    for (uint64_t i = 0; i < MEM / 8; i++) h = (h ^ m[i]) * 1099511628211ull;
    return h;
}

/* The guest: writes random pages; each write is marked dirty after the data is in place, so a
   round that reads the page after the mark reads the new data. */
static void *guest(void *arg) {
    (void)arg;
    uint64_t x = 88172645463325252ull, writes = 0;
    while (!atomic_load(&stop_writer)) {
        x ^= x << 13, x ^= x >> 7, x ^= x << 17;
        uint64_t p = x % PAGES;
        for (uint64_t w = 0; w < PAGE / 8; w++) mem[p * (PAGE / 8) + w] = (p << 32) ^ writes ^ w;
        atomic_fetch_or_explicit(&dirty[p / 64], 1ull << (p % 64), memory_order_release);
        writes++;
        if (writes % 64 == 0) usleep(200); /* a guest that also does other things */
    }
    state[1] = writes;
    return NULL;
}

static int32_t dirty_log(uint64_t *words, size_t count, void *user) {
    (void)user;
    if (count != PAGES / 64) return -1;
    for (size_t i = 0; i < count; i++) words[i] = atomic_exchange_explicit(&dirty[i], 0, memory_order_acquire);
    return 0;
}

static int32_t pause_guest(const uint8_t **out, size_t *len, void *user) {
    (void)user;
    atomic_store(&stop_writer, 1);
    pthread_join(writer, NULL);
    state[0] = checksum(mem);
    *out = (const uint8_t *)state;
    *len = sizeof state;
    return 0;
}

static int source(int port_pipe) {
    mem = mmap(NULL, MEM, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED) return 1;
    for (uint64_t i = 0; i < MEM / 8; i++) mem[i] = i * 2654435761u;
    FerryRegion region = {.guest_phys_addr = 0, .host_addr = mem, .size = MEM, .fd = -1};
    FerrySource *src = NULL;
    if (ferry_source_start(&region, 1, PAGE, "127.0.0.1:0", KEY, sizeof KEY, &src) != FERRY_STATUS_OK) return 1;
    uint16_t port = 0;
    ferry_source_port(src, &port);
    if (write(port_pipe, &port, sizeof port) != sizeof port) return 1;
    pthread_create(&writer, NULL, guest, NULL);
    FerryStats stats;
    FerryStatus st = ferry_source_precopy(src, dirty_log, pause_guest, NULL, 20, 10, 10000, &stats);
    if (st != FERRY_STATUS_OK) {
        fprintf(stderr, "c-precopy: source: status %d: %s\n", (int)st, ferry_last_error());
        return 1;
    }
    printf("source: %llu guest writes, %llu pages pulled in all rounds, downtime %llu us, total %llu us\n",
           (unsigned long long)state[1], (unsigned long long)stats.bulk_pages, (unsigned long long)stats.downtime_us,
           (unsigned long long)stats.total_us);
    fflush(stdout);
    ferry_source_free(src);
    return 0;
}

static uint64_t *dest_mem;
static int32_t resume(const uint8_t *blob, size_t len, void *user) {
    uint64_t want[2];
    if (len != sizeof want) return -1;
    memcpy(want, blob, sizeof want);
    *(int *)user = checksum(dest_mem) == want[0] ? 1 : 2;
    return 0;
}

int main(void) {
    int pipefd[2];
    if (pipe(pipefd) != 0) return 1;
    fflush(stdout);
    pid_t child = fork();
    if (child == 0) {
        close(pipefd[0]);
        _exit(source(pipefd[1]));
    }
    close(pipefd[1]);
    uint16_t port = 0;
    if (read(pipefd[0], &port, sizeof port) != sizeof port) return 1;
    dest_mem = mmap(NULL, MEM, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    FerryRegion region = {.guest_phys_addr = 0, .host_addr = dest_mem, .size = MEM, .fd = -1};
    char addr[32];
    snprintf(addr, sizeof addr, "127.0.0.1:%u", port);
    int verdict = 0;
    FerryStatus st = ferry_precopy_receive(&region, 1, PAGE, addr, KEY, sizeof KEY, resume, &verdict);
    int status = 0;
    waitpid(child, &status, 0);
    int ok = st == FERRY_STATUS_OK && verdict == 1 && WIFEXITED(status) && WEXITSTATUS(status) == 0;
    if (st != FERRY_STATUS_OK) fprintf(stderr, "c-precopy: destination: status %d: %s\n", (int)st, ferry_last_error());
    printf("destination: memory %s the source's at the pause\n", verdict == 1 ? "equals" : "DIFFERS FROM");
    printf("c-precopy: %s\n", ok ? "PASS" : "FAIL");
    return !ok;
}
