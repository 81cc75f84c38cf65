/*
 * Back-and-forth and task-guided pre-copy through ferry's C ABI. Two hosts, A (the parent) and B
 * (a child process), each with 32 MiB of "guest" memory that a writer thread (the guest) changes:
 * it writes random pages in its hot 5% for 2 ms, then is quiet for 2 ms inside a segment it marks
 * as cheap to stop, and so on. The guest moves three times:
 *
 *   trip 1  A -> B  task-guided: the source must stop it inside a quiet segment; B has no image.
 *   trip 2  B -> A  A kept the image the guest left (generation 0): only changed pages move.
 *   trip 3  A -> B  B kept its image (generation 1) but wrote all over it meanwhile: refused with a
 *                   reason, and every page moves into the same memory.
 *   trip 4  B -> A  post-copy onto A's image (generation 2): only the changed pages are absent
 *                   when the guest resumes at A, and only they cross.
 *
 * After each trip the destination checks that its memory has the checksum the source took at the
 * pause, and the guest runs on there.
 *
 *   ./backforth     exit 0 and "c-backforth: PASS" on success
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
#define HOT (PAGES / 20)
#define VM_ID "c-guest-1"

static const uint8_t KEY[32] = "c-embed back-and-forth key 32 b";
static uint64_t *mem;
static _Atomic uint64_t dirty[PAGES / 64];

/* The guest's registers: what crosses in the state blob besides the checksum. */
struct guest_state {
    uint64_t checksum, rng, writes;
};
static struct guest_state regs = {0, 88172645463325252ull, 0};
static pthread_t writer;
static atomic_int in_segment, park_request, parked, stop_writer;

static uint64_t checksum(const uint64_t *m) {
    uint64_t h = 1469598103934665603ull;
    for (uint64_t i = 0; i < MEM / 8; i++) h = (h ^ m[i]) * 1099511628211ull;
    return h;
}

static uint64_t now_us(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000u + (uint64_t)t.tv_nsec / 1000u;
}

/* Parks while a pause is requested: the "vCPU exit" at which the VMM learns where the guest is. */
static void exit_point(void) {
    if (!atomic_load(&park_request)) return;
    atomic_store(&parked, 1);
    while (atomic_load(&park_request) && !atomic_load(&stop_writer)) usleep(20);
    atomic_store(&parked, 0);
}

static void *guest(void *arg) {
    (void)arg;
    while (!atomic_load(&stop_writer)) {
        uint64_t until = now_us() + 2000;
        while (now_us() < until && !atomic_load(&stop_writer)) { /* busy: writes, unmarked */
            exit_point();
            if (atomic_load(&stop_writer)) break;
            regs.rng ^= regs.rng << 13, regs.rng ^= regs.rng >> 7, regs.rng ^= regs.rng << 17;
            uint64_t p = regs.rng % HOT;
            for (uint64_t w = 0; w < PAGE / 8; w++) mem[p * (PAGE / 8) + w] = (p << 32) ^ regs.writes ^ w;
            atomic_fetch_or_explicit(&dirty[p / 64], 1ull << (p % 64), memory_order_release);
            regs.writes++;
        }
        atomic_store(&in_segment, 1); /* quiet, and marked cheap to stop */
        until = now_us() + 2000;
        while (now_us() < until && !atomic_load(&stop_writer)) {
            exit_point();
            usleep(100);
        }
        exit_point();
        atomic_store(&in_segment, 0);
    }
    return NULL;
}

static void start_guest(void) {
    atomic_store(&stop_writer, 0);
    atomic_store(&park_request, 0);
    atomic_store(&in_segment, 0);
    pthread_create(&writer, NULL, guest, NULL);
}

static int32_t dirty_log(uint64_t *words, size_t count, void *user) {
    (void)user;
    if (count != PAGES / 64) return -1;
    for (size_t i = 0; i < count; i++) words[i] = atomic_exchange_explicit(&dirty[i], 0, memory_order_acquire);
    return 0;
}

static int32_t guest_in_segment(void *user) {
    (void)user;
    return atomic_load(&in_segment);
}

/* Stops the guest at its next exit point; told to stop only inside a segment, lets it run on when
   it is found outside (1). */
static int32_t pause_guest(uint32_t anyway, const uint8_t **out, size_t *len, void *user) {
    (void)user;
    atomic_store(&park_request, 1);
    while (!atomic_load(&parked)) usleep(10);
    if (!anyway && !atomic_load(&in_segment)) {
        atomic_store(&park_request, 0);
        return 1;
    }
    atomic_store(&stop_writer, 1);
    pthread_join(writer, NULL);
    regs.checksum = checksum(mem);
    *out = (const uint8_t *)&regs;
    *len = sizeof regs;
    return 0;
}

static int32_t resume(const uint8_t *blob, size_t len, void *user) {
    if (len != sizeof regs) return -1;
    memcpy(&regs, blob, sizeof regs);
    *(int *)user = checksum(mem) == regs.checksum ? 1 : 2;
    /* A new arrival: the changes the next departure reports start from here. */
    for (size_t i = 0; i < PAGES / 64; i++) atomic_store(&dirty[i], 0);
    return 0;
}

static FerryRegion region(void) {
    FerryRegion r = {.guest_phys_addr = 0, .host_addr = mem, .size = MEM, .fd = -1};
    return r;
}

/* Sends the guest away, task-guided when `guided`, naming its base image when `base`. */
static int send_trip(int trip, int port_pipe, const FerryImageId *base, int guided) {
    FerryRegion r = region();
    FerrySource *src = NULL;
    if (ferry_source_start(&r, 1, PAGE, "127.0.0.1:0", KEY, sizeof KEY, &src) != FERRY_STATUS_OK) return 1;
    uint16_t port = 0;
    ferry_source_port(src, &port);
    if (write(port_pipe, &port, sizeof port) != sizeof port) return 1;
    usleep(50000); /* the guest runs a while with its destination connecting */
    FerryPrecopyOptions options = {.downtime_target_ms = 20,
                                   .max_rounds = 10,
                                   .timeout_ms = 10000,
                                   .task_max_wait_ms = guided ? 5000 : 0,
                                   .in_segment = guided ? guest_in_segment : NULL,
                                   .base = base};
    FerryStats stats;
    FerryOutcome outcome;
    FerryStatus st = ferry_source_precopy_with(src, dirty_log, pause_guest, NULL, &options, &stats, &outcome);
    ferry_source_free(src);
    if (st != FERRY_STATUS_OK) {
        fprintf(stderr, "c-backforth: trip %d source: status %d: %s\n", trip, (int)st, ferry_last_error());
        return 1;
    }
    printf("trip %d source: %llu pages in all rounds, %u rounds, downtime %llu us, kept image %s%s%s, "
           "stopped in segment %u (gave up %u, held back %u, waited %llu us)\n",
           trip, (unsigned long long)stats.bulk_pages, outcome.rounds, (unsigned long long)stats.downtime_us,
           outcome.kept_image_used ? "used" : "not used", outcome.refused[0] ? ": " : "", outcome.refused,
           outcome.stopped_in_segment, outcome.task_gave_up, outcome.task_held_back,
           (unsigned long long)outcome.task_wait_us);
    fflush(stdout);
    if (guided && !outcome.stopped_in_segment) return 1;
    if (base && outcome.kept_image_used && stats.bulk_pages >= PAGES / 4) return 1;
    return 0;
}

/* Receives the guest onto `mem`, which holds the image named `kept` (or nothing). Returns 0 when
   the memory matched the source's checksum and the kept image was used exactly when `expect_kept`. */
static int receive_trip(int trip, int port_pipe, const FerryImageId *kept, int expect_kept) {
    uint16_t port = 0;
    if (read(port_pipe, &port, sizeof port) != sizeof port) return 1;
    char addr[32];
    snprintf(addr, sizeof addr, "127.0.0.1:%u", port);
    FerryRegion r = region();
    int verdict = 0;
    FerryOutcome outcome;
    FerryStatus st = ferry_precopy_receive_with(&r, 1, PAGE, addr, KEY, sizeof KEY, kept, resume, &verdict, &outcome);
    if (st != FERRY_STATUS_OK) {
        fprintf(stderr, "c-backforth: trip %d destination: status %d: %s\n", trip, (int)st, ferry_last_error());
        return 1;
    }
    printf("trip %d destination: memory %s the source's at the pause; kept image %s%s%s\n", trip,
           verdict == 1 ? "equals" : "DIFFERS FROM", outcome.kept_image_used ? "used" : "not used",
           outcome.refused[0] ? ": " : "", outcome.refused);
    fflush(stdout);
    if (verdict != 1 || outcome.kept_image_used != expect_kept) return 1;
    if (!expect_kept && kept && !outcome.refused[0]) return 1;
    start_guest();
    return 0;
}

/* Post-copy: the guest, still running, offers its base; paused, it is handed over. */
static int send_postcopy(int trip, int port_pipe, const FerryImageId *base) {
    FerryRegion r = region();
    FerrySource *src = NULL;
    if (ferry_source_start(&r, 1, PAGE, "127.0.0.1:0", KEY, sizeof KEY, &src) != FERRY_STATUS_OK) return 1;
    uint16_t port = 0;
    ferry_source_port(src, &port);
    if (write(port_pipe, &port, sizeof port) != sizeof port) return 1;
    FerryOutcome outcome;
    FerryStatus st = ferry_source_offer_base(src, base, dirty_log, NULL, 10000, &outcome);
    const uint8_t *state = NULL;
    size_t len = 0;
    if (st == FERRY_STATUS_OK && pause_guest(1, &state, &len, NULL) != 0) st = FERRY_STATUS_ERR_INTERNAL;
    FerryStats stats;
    if (st == FERRY_STATUS_OK) st = ferry_source_handoff(src, state, len, NULL, 0, 10000, &stats);
    ferry_source_free(src);
    if (st != FERRY_STATUS_OK) {
        fprintf(stderr, "c-backforth: trip %d source: status %d: %s\n", trip, (int)st, ferry_last_error());
        return 1;
    }
    printf("trip %d source (post-copy): kept image %s%s%s, downtime %llu us\n", trip,
           outcome.kept_image_used ? "used" : "not used", outcome.refused[0] ? ": " : "", outcome.refused,
           (unsigned long long)stats.downtime_us);
    fflush(stdout);
    return !outcome.kept_image_used;
}

static struct guest_state arrived;
static int32_t resume_later(const uint8_t *blob, size_t len, void *user) {
    (void)user;
    if (len != sizeof arrived) return -1;
    memcpy(&arrived, blob, sizeof arrived);
    return 0;
}

/* Post-copy onto the image `kept`: the memory is checked once every page is present, then the
   guest runs on. */
static int receive_postcopy(int trip, int port_pipe, const FerryImageId *kept) {
    uint16_t port = 0;
    if (read(port_pipe, &port, sizeof port) != sizeof port) return 1;
    char addr[32];
    snprintf(addr, sizeof addr, "127.0.0.1:%u", port);
    FerryRegion r = region();
    FerryDestination *dst = NULL;
    FerryOutcome outcome;
    FerryStats stats;
    FerryStatus st = ferry_destination_connect_with(&r, 1, PAGE, addr, KEY, sizeof KEY, FERRY_PREPAGER_BUBBLING,
                                                    kept, &dst, &outcome);
    if (st == FERRY_STATUS_OK) st = ferry_destination_start(dst, resume_later, NULL);
    if (st == FERRY_STATUS_OK) st = ferry_destination_wait(dst, &stats);
    ferry_destination_free(dst);
    if (st != FERRY_STATUS_OK) {
        fprintf(stderr, "c-backforth: trip %d destination: status %d: %s\n", trip, (int)st, ferry_last_error());
        return 1;
    }
    int equal = checksum(mem) == arrived.checksum;
    uint64_t moved = stats.urgent_pages + stats.bulk_pages;
    printf("trip %d destination (post-copy): memory %s the source's at the pause; kept image %s; %llu of %llu "
           "pages crossed\n",
           trip, equal ? "equals" : "DIFFERS FROM", outcome.kept_image_used ? "used" : "not used",
           (unsigned long long)moved, (unsigned long long)PAGES);
    fflush(stdout);
    if (!equal || !outcome.kept_image_used || moved >= PAGES / 4) return 1;
    regs = arrived;
    for (size_t i = 0; i < PAGES / 64; i++) atomic_store(&dirty[i], 0);
    start_guest();
    return 0;
}

static void *map_memory(void) {
    void *m = mmap(NULL, MEM, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    return m == MAP_FAILED ? NULL : m;
}

/* Host B: receives, sends back, receives onto an image it wrote over. */
static int host_b(int from_a, int to_a) {
    if (!(mem = map_memory())) return 1;
    if (receive_trip(1, from_a, NULL, 0)) return 1;
    usleep(100000);
    FerryImageId base = {.vm_id = VM_ID, .generation = 0};
    if (send_trip(2, to_a, &base, 0)) return 1;
    /* B keeps the image the guest left (generation 1), then writes every other page of it. */
    for (uint64_t p = 0; p < PAGES; p += 2) mem[p * (PAGE / 8) + 1] ^= 0x5a5a;
    FerryImageId kept = {.vm_id = VM_ID, .generation = 1};
    if (receive_trip(3, from_a, &kept, 0)) return 1;
    usleep(100000);
    FerryImageId base4 = {.vm_id = VM_ID, .generation = 2};
    /* The guest left by post-copy: its writer stopped at the pause. */
    return send_postcopy(4, to_a, &base4);
}

int main(void) {
    int a_to_b[2], b_to_a[2];
    if (pipe(a_to_b) != 0 || pipe(b_to_a) != 0) return 1;
    fflush(stdout);
    pid_t child = fork();
    if (child == 0) {
        close(a_to_b[1]);
        close(b_to_a[0]);
        _exit(host_b(a_to_b[0], b_to_a[1]));
    }
    close(a_to_b[0]);
    close(b_to_a[1]);
    int failed = 0;
    if (!(mem = map_memory())) return 1;
    for (uint64_t i = 0; i < MEM / 8; i++) mem[i] = i * 2654435761u;
    start_guest();
    usleep(100000);
    failed |= send_trip(1, a_to_b[1], NULL, 1);
    /* A keeps the image the guest left (generation 0): its memory, mapped and unwritten. */
    FerryImageId kept = {.vm_id = VM_ID, .generation = 0};
    if (!failed) failed |= receive_trip(2, b_to_a[0], &kept, 1);
    if (!failed) {
        usleep(100000);
        FerryImageId base = {.vm_id = VM_ID, .generation = 1};
        failed |= send_trip(3, a_to_b[1], &base, 0);
    }
    /* A keeps the image the guest left again (generation 2): the guest comes back by post-copy. */
    FerryImageId kept4 = {.vm_id = VM_ID, .generation = 2};
    if (!failed) failed |= receive_postcopy(4, b_to_a[0], &kept4);
    if (!failed) {
        atomic_store(&stop_writer, 1);
        pthread_join(writer, NULL);
    }
    close(a_to_b[1]);
    int status = 0;
    waitpid(child, &status, 0);
    int ok = !failed && WIFEXITED(status) && WEXITSTATUS(status) == 0;
    printf("c-backforth: %s\n", ok ? "PASS" : "FAIL");
    return !ok;
}
