/*
 * c-embed failover: post-copy that survives its destination, from C. The parent is the source: it
 * owns 32 MiB of "guest" memory (all zero) and hands it over post-copy to the child, a destination
 * process that pages on demand and is protected: it takes the lease, checkpoints what its guest
 * writes every 20 ms back to the source, and releases output only once a checkpoint is committed.
 * Its guest is a thread that writes random pages: page p holds (p << 32 | version[p]) in every
 * word, the version table lives in guest memory's first pages, and the thread's write count is
 * its register (the state blob). After three committed checkpoints the child tells the parent,
 * which SIGKILLs it. The handoff fails; ferry_source_restart takes the lease and gives the last
 * checkpoint's state; the parent checks that guest memory is exactly that checkpoint: every page
 * consistent with the version table, and the versions summing to the write count in the state.
 *
 *   ./failover LEASE_DIR          exit 0 and "c-failover: PASS" on success
 */
#define _GNU_SOURCE
#include <ferry.h>

#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#define MEM (32ull << 20)
#define PAGE 4096u
#define PAGES (MEM / PAGE)
#define WORDS_PER_PAGE (PAGE / 8)
/* version[] (a u32 per page) fills the first pages; data pages follow. */
#define TABLE_PAGES ((PAGES * 4 + PAGE - 1) / PAGE)
#define MAGIC 0xfe44fa11u

static const uint8_t KEY[32] = {'c', '-', 'f', 'a', 'i', 'l', 'o', 'v', 'e', 'r', ' ', 'k', 'e', 'y', '0', '1',
                                '2', '3', '4', '5', '6', '7', '8', '9', 'a', 'b', 'c', 'd', 'e', 'f', 'g', 'h'};

/* The guest's registers: what a checkpoint's state blob holds. */
struct regs {
    uint32_t magic;
    uint32_t pad;
    uint64_t writes;
    uint64_t rng;
};

static int fail(const char *what, FerryStatus status) {
    fprintf(stderr, "c-failover: %s: status %d: %s\n", what, (int)status, ferry_last_error());
    return 1;
}

/* ---- the destination's guest and its VMM callbacks ---- */

static uint64_t *guest_mem;
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
static int paused, halted;
static struct regs regs, captured;
static uint64_t dirty[(PAGES + 63) / 64];
static int committed_count, told_parent;
static int tell_parent = -1;

static void mark(uint64_t page) { dirty[page / 64] |= 1ull << (page % 64); }

static void *guest(void *arg) {
    (void)arg;
    uint32_t *version = (uint32_t *)guest_mem;
    for (;;) {
        pthread_mutex_lock(&mu);
        while (paused && !halted) pthread_cond_wait(&cv, &mu);
        if (halted) {
            pthread_mutex_unlock(&mu);
            return NULL;
        }
        /* xorshift64: the next page to write */
        regs.rng ^= regs.rng << 13;
        regs.rng ^= regs.rng >> 7;
        regs.rng ^= regs.rng << 17;
        uint64_t p = TABLE_PAGES + regs.rng % (PAGES - TABLE_PAGES);
        uint32_t v = ++version[p];
        for (uint64_t w = 0; w < WORDS_PER_PAGE; w++) guest_mem[p * WORDS_PER_PAGE + w] = (p << 32) | v;
        mark(p);
        mark(p * 4 / PAGE);
        regs.writes++;
        pthread_mutex_unlock(&mu);
    }
}

static int on_resume(const uint8_t *state, size_t len, void *user) {
    (void)user;
    if (len != sizeof regs) return 1;
    memcpy(&regs, state, sizeof regs);
    if (regs.magic != MAGIC) return 2;
    pthread_t t;
    return pthread_create(&t, NULL, guest, NULL) == 0 ? 0 : 3;
}

static int ck_pause(uint64_t epoch, const uint8_t **state, size_t *len, void *user) {
    (void)epoch, (void)user;
    pthread_mutex_lock(&mu); /* no write is in progress while we hold it */
    paused = 1;
    captured = regs;
    pthread_mutex_unlock(&mu);
    *state = (const uint8_t *)&captured;
    *len = sizeof captured;
    return 0;
}

static int ck_dirty(uint64_t *words, size_t count, void *user) {
    (void)user;
    pthread_mutex_lock(&mu);
    size_t n = count < sizeof dirty / 8 ? count : sizeof dirty / 8;
    memcpy(words, dirty, n * 8);
    memset(dirty, 0, sizeof dirty);
    pthread_mutex_unlock(&mu);
    return 0;
}

static int ck_resume(void *user) {
    (void)user;
    pthread_mutex_lock(&mu);
    paused = 0;
    pthread_cond_broadcast(&cv);
    pthread_mutex_unlock(&mu);
    return 0;
}

static void ck_committed(uint64_t epoch, void *user) {
    (void)epoch, (void)user;
    if (++committed_count >= 3 && !told_parent) {
        told_parent = 1;
        char c = 'k';
        if (write(tell_parent, &c, 1) != 1) _exit(5);
    }
}

static void ck_halt(void *user) {
    (void)user;
    pthread_mutex_lock(&mu);
    halted = 1;
    pthread_cond_broadcast(&cv);
    pthread_mutex_unlock(&mu);
}

static int destination(uint16_t port, const char *lease) {
    guest_mem = mmap(NULL, MEM, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (guest_mem == MAP_FAILED) return 1;
    FerryRegion region = {.guest_phys_addr = 0, .size = MEM, .host_addr = guest_mem, .fd = -1};
    char addr[32];
    snprintf(addr, sizeof addr, "127.0.0.1:%u", (unsigned)port);
    FerryDestination *d = NULL;
    FerryStatus st = ferry_destination_connect(&region, 1, PAGE, addr, KEY, sizeof KEY, FERRY_PREPAGER_DEMAND, &d);
    if (st != FERRY_STATUS_OK) return fail("destination connect", st);
    FerryRecovery settings = {.recovery_window_ms = 1000, .lease_path = lease, .lease_holder = "c-destination"};
    FerryCheckpointer ck = {.period_ms = 20,
                            .pause = ck_pause,
                            .dirty_log = ck_dirty,
                            .resume = ck_resume,
                            .committed = ck_committed,
                            .halt = ck_halt};
    if ((st = ferry_destination_protect(d, &settings, &ck, NULL)) != FERRY_STATUS_OK) return fail("protect", st);
    if ((st = ferry_destination_start(d, on_resume, NULL)) != FERRY_STATUS_OK) return fail("start", st);
    /* Demand paging never completes by itself: the guest runs until the parent kills us. */
    for (;;) pause();
}

/* ---- the source ---- */

static pid_t child;
static int from_child = -1;

static void *killer(void *arg) {
    (void)arg;
    char c;
    if (read(from_child, &c, 1) == 1) kill(child, SIGKILL);
    return NULL;
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s LEASE_DIR\n", argv[0]);
        return 2;
    }
    char lease[512];
    snprintf(lease, sizeof lease, "%s/c-failover-%d.lease", argv[1], (int)getpid());
    unlink(lease);
    int port_pipe[2], tell[2];
    if (pipe(port_pipe) != 0 || pipe(tell) != 0) return 1;
    child = fork();
    if (child < 0) return 1;
    if (child == 0) {
        close(port_pipe[1]);
        close(tell[0]);
        tell_parent = tell[1];
        uint16_t port;
        if (read(port_pipe[0], &port, sizeof port) != sizeof port) _exit(1);
        _exit(destination(port, lease));
    }
    close(port_pipe[0]);
    close(tell[1]);
    from_child = tell[0];

    uint64_t *mem = mmap(NULL, MEM, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED) return 1;
    FerryRegion region = {.guest_phys_addr = 0, .size = MEM, .host_addr = mem, .fd = -1};
    FerrySource *s = NULL;
    FerryStatus st = ferry_source_start(&region, 1, PAGE, "127.0.0.1:0", KEY, sizeof KEY, &s);
    if (st != FERRY_STATUS_OK) return fail("source start", st);
    FerryRecovery settings = {.recovery_window_ms = 1000, .lease_path = lease, .lease_holder = "c-source"};
    if ((st = ferry_source_protect(s, &settings)) != FERRY_STATUS_OK) return fail("source protect", st);
    uint16_t port;
    if ((st = ferry_source_port(s, &port)) != FERRY_STATUS_OK) return fail("port", st);
    if (write(port_pipe[1], &port, sizeof port) != sizeof port) return 1;

    pthread_t k;
    pthread_create(&k, NULL, killer, NULL);
    struct regs start = {.magic = MAGIC, .writes = 0, .rng = 0x9e3779b97f4a7c15ull};
    st = ferry_source_handoff(s, (const uint8_t *)&start, sizeof start, NULL, 0, 30000, NULL);
    int status = 0;
    waitpid(child, &status, 0);
    pthread_join(k, NULL);
    if (st == FERRY_STATUS_OK) {
        fprintf(stderr, "c-failover: the handoff completed although the destination was killed\n");
        return 1;
    }
    printf("c-failover: destination %s; handoff: status %d (%s)\n",
           WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL ? "killed" : "NOT killed", (int)st, ferry_last_error());

    /* A second handoff is refused; restart is what a failed one allows. */
    if (ferry_source_handoff(s, (const uint8_t *)&start, sizeof start, NULL, 0, 10, NULL) != FERRY_STATUS_ERR_STATE)
        return fail("a second handoff was not refused", FERRY_STATUS_OK);
    const uint8_t *state = NULL;
    size_t len = 0;
    uint64_t epoch = 0;
    if ((st = ferry_source_restart(s, 10000, &state, &len, &epoch)) != FERRY_STATUS_OK) return fail("restart", st);
    struct regs r;
    if (len != sizeof r) return fail("restart state of the wrong size", FERRY_STATUS_OK);
    memcpy(&r, state, sizeof r);

    /* Guest memory is the checkpoint: consistent, and exactly as many writes as its state says. */
    const uint32_t *version = (const uint32_t *)mem;
    uint64_t sum = 0, wrong = 0;
    for (uint64_t p = TABLE_PAGES; p < PAGES; p++) {
        sum += version[p];
        uint64_t want = version[p] ? (p << 32) | version[p] : 0;
        for (uint64_t w = 0; w < WORDS_PER_PAGE; w++) wrong += mem[p * WORDS_PER_PAGE + w] != want;
    }
    printf("c-failover: restarted from checkpoint %llu: %llu writes in the state, versions sum to %llu, "
           "%llu words wrong\n",
           (unsigned long long)epoch, (unsigned long long)r.writes, (unsigned long long)sum,
           (unsigned long long)wrong);
    ferry_source_free(s);
    unlink(lease);
    int ok = WIFSIGNALED(status) && epoch >= 3 && r.magic == MAGIC && r.writes > 0 && sum == r.writes && wrong == 0;
    printf("c-failover: %s\n", ok ? "PASS" : "FAIL");
    return ok ? 0 : 1;
}
