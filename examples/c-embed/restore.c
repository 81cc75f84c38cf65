/*
 * c-restore: a C program that snapshots its "guest" memory with ferry and restores it three ways.
 * It fills 64 MiB (some pages zero, a range it calls free), saves it with a state blob, then:
 *   1. restores eagerly into fresh memory and checks every byte;
 *   2. restores lazily on demand paging, recording the working set: its "vCPU" thread starts
 *      touching random pages the moment the resume callback runs, each faulting in from the file;
 *      then ferry fetches the rest and every byte is checked;
 *   3. restores lazily again, bubbling after replaying that working set: the same touches now find
 *      most pages fetched ahead, so far fewer of them wait for a read of the file;
 * and walks the error paths (a missing file, a corrupt one, memory of the wrong size, replay
 * without a working set, unknown flags).
 *
 *   ./restore DIR [anon|memfd]      exit 0 and "c-restore: PASS" on success
 */
#define _GNU_SOURCE
#include <ferry.h>

#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define MEM (64ull << 20)
#define PAGE 4096u
#define PAGES (MEM / PAGE)
#define WORDS_PER_PAGE (PAGE / 8)
#define FREE_FIRST 8192u
#define FREE_COUNT 1024u
#define WORKING_SET 4096u

static const char STATE[] = "vcpu and device state at the snapshot";
static int use_memfd;
static uint64_t working_set[WORKING_SET];

static uint64_t expected(uint64_t page, uint64_t word) {
    if (page % 7 == 3 || (page >= FREE_FIRST && page < FREE_FIRST + FREE_COUNT)) return 0;
    return ((page * 0x9e3779b97f4a7c15ull) ^ (word * 0xbf58476d1ce4e5b9ull)) | 1;
}

static uint64_t zero_pages(void) {
    uint64_t n = 0;
    for (uint64_t p = 0; p < PAGES; p++) n += expected(p, 0) == 0;
    return n;
}

static int fail(const char *what, FerryStatus status) {
    fprintf(stderr, "c-restore: %s: status %d: %s\n", what, (int)status, ferry_last_error());
    return 1;
}

/* Fresh, untouched guest memory: a memfd mapping (filled in place) or anonymous memory. */
static FerryRegion map_guest(uint64_t size) {
    FerryRegion r = {.guest_phys_addr = 0, .host_addr = NULL, .size = size, .fd = -1};
    if (use_memfd) {
        r.fd = memfd_create("c-restore", MFD_CLOEXEC);
        if (r.fd < 0 || ftruncate(r.fd, (off_t)size) != 0) return r;
        r.host_addr = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, r.fd, 0);
    } else {
        r.host_addr = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    }
    if (r.host_addr == MAP_FAILED) r.host_addr = NULL;
    return r;
}

static void unmap_guest(FerryRegion *r) {
    munmap(r->host_addr, r->size);
    if (r->fd >= 0) close(r->fd);
}

static uint64_t page_errors(const uint64_t *mem, uint64_t page) {
    uint64_t wrong = 0;
    for (uint64_t w = 0; w < WORDS_PER_PAGE; w++) wrong += mem[page * WORDS_PER_PAGE + w] != expected(page, w);
    return wrong;
}

static uint64_t all_errors(const uint64_t *mem) {
    uint64_t wrong = 0;
    for (uint64_t p = 0; p < PAGES; p++) wrong += page_errors(mem, p);
    return wrong;
}

/* The "vCPU": touches the working set in order, checking each page, while memory arrives. */
struct vcpu {
    const uint64_t *mem;
    uint64_t wrong;
    int state_ok;
    pthread_t thread;
};

static void *run_vcpu(void *arg) {
    struct vcpu *v = arg;
    for (unsigned i = 0; i < WORKING_SET; i++) v->wrong += page_errors(v->mem, working_set[i]);
    return NULL;
}

static int32_t resume(const uint8_t *state, size_t len, void *user) {
    struct vcpu *v = user;
    v->state_ok = len == sizeof STATE && memcmp(state, STATE, len) == 0;
    return pthread_create(&v->thread, NULL, run_vcpu, v) == 0 ? 0 : -1;
}

static int lazy(const FerryImage *image, uint32_t prepager, uint32_t flags, FerryStats *stats) {
    FerryRegion region = map_guest(MEM);
    if (!region.host_addr) return 1;
    struct vcpu v = {.mem = region.host_addr};
    FerryRestore *restore = NULL;
    FerryStatus st = ferry_restore_lazy(image, &region, 1, prepager, flags, resume, &v, &restore);
    if (st != FERRY_STATUS_OK) return fail("ferry_restore_lazy", st);
    pthread_join(v.thread, NULL);
    /* Demand only fetches what the guest touches: fetch the rest now. */
    if (prepager == FERRY_PREPAGER_DEMAND && (st = ferry_restore_finish(restore)) != FERRY_STATUS_OK)
        return fail("ferry_restore_finish", st);
    st = ferry_restore_wait(restore, stats);
    if (st != FERRY_STATUS_OK) return fail("ferry_restore_wait", st);
    ferry_restore_free(restore);
    uint64_t wrong = v.wrong + all_errors(region.host_addr);
    unmap_guest(&region);
    printf("lazy%s: resumed in %llu us, %llu network faults, %llu in flight, %llu bulk pages, %llu words wrong\n",
           flags & FERRY_RESTORE_REPLAY ? " (replay)" : " (record)", (unsigned long long)stats->downtime_us,
           (unsigned long long)stats->network_faults, (unsigned long long)stats->inflight_faults,
           (unsigned long long)stats->bulk_pages, (unsigned long long)wrong);
    return wrong != 0 || !v.state_ok || stats->pages_sent_twice != 0;
}

static int expect(const char *what, FerryStatus got, FerryStatus want) {
    if (got == want) {
        printf("refused as expected: %s: %s\n", what, ferry_last_error());
        return 0;
    }
    fprintf(stderr, "c-restore: %s: status %d, expected %d (%s)\n", what, (int)got, (int)want, ferry_last_error());
    return 1;
}

static int error_paths(const char *dir, const FerryImage *image) {
    char path[512];
    int failed = 0;
    FerryImage *bad = NULL;
    snprintf(path, sizeof path, "%s/no-such-image", dir);
    failed += expect("a missing file", ferry_image_open(path, &bad), FERRY_STATUS_ERR_IO);
    snprintf(path, sizeof path, "%s/garbage", dir);
    FILE *f = fopen(path, "w");
    for (int i = 0; f && i < 100000; i++) fputc(i * 31, f);
    if (f) fclose(f);
    failed += expect("a file that is no image", ferry_image_open(path, &bad), FERRY_STATUS_ERR_INVALID_ARGUMENT);

    FerryRegion small = map_guest(MEM / 2);
    struct vcpu v = {.mem = small.host_addr};
    FerryRestore *restore = NULL;
    failed += expect("memory of the wrong size",
                     ferry_restore_lazy(image, &small, 1, FERRY_PREPAGER_PUSH, 0, resume, &v, &restore),
                     FERRY_STATUS_ERR_LAYOUT);
    failed += expect("eager into memory of the wrong size", ferry_restore_eager(image, &small, 1, NULL),
                     FERRY_STATUS_ERR_LAYOUT);
    unmap_guest(&small);
    FerryRegion region = map_guest(MEM);
    failed += expect("unknown flags", ferry_restore_lazy(image, &region, 1, FERRY_PREPAGER_PUSH, 0x80, resume, &v, &restore),
                     FERRY_STATUS_ERR_INVALID_ARGUMENT);
    failed += expect("an unknown pre-pager", ferry_restore_lazy(image, &region, 1, 9, 0, resume, &v, &restore),
                     FERRY_STATUS_ERR_INVALID_ARGUMENT);
    unmap_guest(&region);
    return failed;
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s DIR [anon|memfd]\n", argv[0]);
        return 2;
    }
    const char *dir = argv[1];
    use_memfd = argc > 2 && strcmp(argv[2], "memfd") == 0;
    char path[512];
    snprintf(path, sizeof path, "%s/guest-%s.img", dir, use_memfd ? "memfd" : "anon");

    FerryRegion source = map_guest(MEM);
    if (!source.host_addr) return 1;
    uint64_t *mem = source.host_addr;
    for (uint64_t p = 0; p < PAGES; p++)
        for (uint64_t w = 0; w < WORDS_PER_PAGE; w++) mem[p * WORDS_PER_PAGE + w] = expected(p, w);
    /* Free pages hold junk at the snapshot: ferry neither stores them nor restores the junk. */
    memset(&mem[(uint64_t)FREE_FIRST * WORDS_PER_PAGE], 0xEE, (size_t)FREE_COUNT * PAGE);
    uint64_t free_bitmap[PAGES / 64] = {0};
    for (uint64_t p = FREE_FIRST; p < FREE_FIRST + FREE_COUNT; p++) free_bitmap[p / 64] |= 1ull << (p % 64);
    uint64_t written = 0;
    FerryStatus st = ferry_snapshot_save(&source, 1, PAGE, path, (const uint8_t *)STATE, sizeof STATE, free_bitmap,
                                         PAGES / 64, &written);
    if (st != FERRY_STATUS_OK) return fail("ferry_snapshot_save", st);
    unmap_guest(&source);
    char ws_path[520];
    snprintf(ws_path, sizeof ws_path, "%s.ws", path);
    unlink(ws_path); /* from an earlier run */

    FerryImage *image = NULL;
    st = ferry_image_open(path, &image);
    if (st != FERRY_STATUS_OK) return fail("ferry_image_open", st);
    FerryImageInfo info;
    uint64_t gpa = 1, size = 0;
    const uint8_t *state = NULL;
    size_t state_len = 0;
    if ((st = ferry_image_info(image, &info)) != FERRY_STATUS_OK) return fail("ferry_image_info", st);
    if ((st = ferry_image_region(image, 0, &gpa, &size)) != FERRY_STATUS_OK) return fail("ferry_image_region", st);
    if ((st = ferry_image_state(image, &state, &state_len)) != FERRY_STATUS_OK) return fail("ferry_image_state", st);
    printf("image: %llu bytes written, %u region(s) of %llu bytes at %llu, %llu zero pages, state %zu bytes\n",
           (unsigned long long)written, info.region_count, (unsigned long long)size, (unsigned long long)gpa,
           (unsigned long long)info.zero_pages, state_len);
    if (info.page_size != PAGE || info.region_count != 1 || info.total_bytes != MEM || size != MEM || gpa != 0 ||
        info.has_working_set || state_len != sizeof STATE || memcmp(state, STATE, state_len) != 0 ||
        info.zero_pages != zero_pages()) {
        fprintf(stderr, "c-restore: the image's info does not match what was saved\n");
        return 1;
    }

    FerryRegion eager = map_guest(MEM);
    FerryStats stats = {0};
    if ((st = ferry_restore_eager(image, &eager, 1, &stats)) != FERRY_STATUS_OK) return fail("ferry_restore_eager", st);
    uint64_t wrong = all_errors(eager.host_addr);
    unmap_guest(&eager);
    printf("eager: %llu pages read in %llu us, %llu words wrong\n", (unsigned long long)stats.bulk_pages,
           (unsigned long long)stats.total_us, (unsigned long long)wrong);
    if (wrong != 0 || stats.bulk_pages > PAGES - info.zero_pages) return 1;

    srand(7);
    for (unsigned i = 0; i < WORKING_SET; i++) working_set[i] = (uint64_t)rand() % PAGES;
    FerryRestore *restore = NULL;
    FerryRegion unused = map_guest(MEM);
    struct vcpu v = {.mem = unused.host_addr};
    FerryStatus no_ws = ferry_restore_lazy(image, &unused, 1, FERRY_PREPAGER_BUBBLING, FERRY_RESTORE_REPLAY, resume,
                                           &v, &restore);
    unmap_guest(&unused);
    if (expect("replay without a working set", no_ws, FERRY_STATUS_ERR_INVALID_ARGUMENT)) return 1;

    FerryStats recorded = {0}, replayed = {0};
    /* Recorded on demand paging (as REAP does): every page the guest touches faults, so the set
     * is all of them, in the order it needs them. */
    if (lazy(image, FERRY_PREPAGER_DEMAND, FERRY_RESTORE_RECORD, &recorded)) return 1;
    if ((st = ferry_image_info(image, &info)) != FERRY_STATUS_OK || !info.has_working_set) {
        fprintf(stderr, "c-restore: no working set was recorded\n");
        return 1;
    }
    if (lazy(image, FERRY_PREPAGER_BUBBLING, FERRY_RESTORE_REPLAY, &replayed)) return 1;
    /* Counts, not times: with the set fetched ahead, few touches wait for a read of the file. */
    if (replayed.network_faults * 2 > recorded.network_faults) {
        fprintf(stderr, "c-restore: replay did not cut network faults (%llu vs %llu)\n",
                (unsigned long long)replayed.network_faults, (unsigned long long)recorded.network_faults);
        return 1;
    }
    int failed = error_paths(dir, image);
    ferry_image_free(image);
    if (failed) return 1;
    printf("c-restore: PASS\n");
    return 0;
}
