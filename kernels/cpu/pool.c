/* Row splitting inside the library: one call per matrix runs its rows on the pool's threads.

   Splitting from Python (kernels/cpu.py RowSplitter) costs ~70 us per call on a 2-core VM (a thread pool's
   submit, wake-up and join; BENCHMARKS.md section 0.9), and a decode token makes ~21 such calls. Here the
   caller publishes the call (a generation counter), the workers take chunks of rows as the caller does (a
   compare-and-swap on a ticket that carries the call's generation), and the caller waits until every chunk
   is done. Workers spin briefly for the next call (a token's calls come back to back), then sleep on a
   condition variable, so an idle process or a core taken by another program costs nothing for long. Chunks are taken dynamically: a thread slowed by
   another process takes fewer. One call at a time (a mutex); a forked child starts its own workers. */
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

/* the kernels this file splits (mwq_cpu.c, dense_cpu.c): struct pointers are opaque here */
void d2_gemv_rows(const void *m, const void *q, float *y, int64_t ystride, int32_t r0, int32_t r1, float *scratch,
                  int32_t force_portable);
void d2_dense_rows(const void *W, int32_t dtype, const float *scale, int32_t cols, const float *x, int32_t ntok,
                   float *y, int64_t ystride, int32_t r0, int32_t r1, int32_t force_portable);

#define D2_POOL_MAX 64
#define D2_POOL_CHUNKS 64
#define D2_SPIN_NS 300000 /* how long an idle worker waits for the next call before it sleeps */

typedef struct {
    int kind; /* 0: d2_gemv_rows, 1: d2_dense_rows, 2: item(ctx, i) for each i in the chunk */
    const void *a, *b;
    const float *scale, *x;
    float *y;
    int64_t ystride, scratch_floats;
    int32_t dtype, cols, ntok, force_portable, nchunks;
    int32_t edges[D2_POOL_CHUNKS + 1];
    void (*item)(void *ctx, int32_t i);
    void *ctx;
} d2_job;

static pthread_mutex_t call_lock = PTHREAD_MUTEX_INITIALIZER; /* one call at a time */
static pthread_mutex_t sleep_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t wake = PTHREAD_COND_INITIALIZER;
static d2_job job;
static volatile uint64_t generation; /* bumped once a call's job is published */
/* (generation << 32) | next chunk: a thread takes a chunk only by a compare-and-swap that sees its own
   generation, so one still finishing an earlier call can never take (or skip) a chunk of this one */
static volatile uint64_t ticket;
static volatile int32_t done_chunks;
static int workers;   /* threads started besides the caller */
static pid_t owner;   /* the process that started them */
static volatile int sleepers;

static int64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

static float *thread_scratch(int64_t n) {
    static __thread float *buf;
    static __thread int64_t cap;
    if (n > cap) {
        free(buf);
        buf = (float *)malloc((size_t)(n > 0 ? n : 1) * sizeof(float));
        cap = buf ? n : 0;
    }
    return buf;
}

/* Take and run chunks of call `g` until none are left (or another call has replaced it). */
static void run_chunks(uint64_t g) {
    for (;;) {
        uint64_t t = __atomic_load_n(&ticket, __ATOMIC_ACQUIRE);
        if ((t >> 32) != (g & 0xffffffffu)) return;
        const int32_t c = (int32_t)(t & 0xffffffffu);
        if (c >= job.nchunks) return;
        if (!__atomic_compare_exchange_n(&ticket, &t, t + 1, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) continue;
        const int32_t r0 = job.edges[c], r1 = job.edges[c + 1];
        if (job.kind == 0)
            d2_gemv_rows(job.a, job.b, job.y, job.ystride, r0, r1, thread_scratch(job.scratch_floats), job.force_portable);
        else if (job.kind == 1)
            d2_dense_rows(job.a, job.dtype, job.scale, job.cols, job.x, job.ntok, job.y, job.ystride, r0, r1,
                          job.force_portable);
        else
            for (int32_t i = r0; i < r1; i++) job.item(job.ctx, i);
        __atomic_fetch_add(&done_chunks, 1, __ATOMIC_ACQ_REL);
    }
}

static void *worker_main(void *arg) {
    (void)arg;
    uint64_t seen = __atomic_load_n(&generation, __ATOMIC_ACQUIRE);
    for (;;) {
        const int64_t until = now_ns() + D2_SPIN_NS;
        uint64_t g;
        while ((g = __atomic_load_n(&generation, __ATOMIC_ACQUIRE)) == seen && now_ns() < until)
            sched_yield(); /* a core shared with another program goes to it */
        if (g == seen) {
            /* Dekker with the caller (full barriers both sides): this thread counts itself asleep, then
               looks at the generation; the caller stores the generation, then looks at the sleepers */
            pthread_mutex_lock(&sleep_lock);
            __atomic_add_fetch(&sleepers, 1, __ATOMIC_SEQ_CST);
            while ((g = __atomic_load_n(&generation, __ATOMIC_SEQ_CST)) == seen) {
                struct timespec t;
                clock_gettime(CLOCK_REALTIME, &t);
                t.tv_nsec += 20000000; /* 20 ms: a safety net, not the wake-up path */
                if (t.tv_nsec >= 1000000000) {
                    t.tv_sec++;
                    t.tv_nsec -= 1000000000;
                }
                pthread_cond_timedwait(&wake, &sleep_lock, &t);
            }
            __atomic_sub_fetch(&sleepers, 1, __ATOMIC_SEQ_CST);
            pthread_mutex_unlock(&sleep_lock);
        }
        seen = g;
        run_chunks(g);
    }
    return NULL;
}

/* Start workers so that `threads` threads (the caller's included) run a call. Workers are never stopped:
   a smaller count later leaves extra ones idle (asleep after D2_SPIN_NS), which only costs their stacks. */
static void ensure_workers(int threads) {
    const pid_t me = getpid();
    if (owner != me) { /* first use, or a forked child: the parent's workers are not here */
        if (owner != 0) { /* a parent's worker may have held these at the fork */
            pthread_mutex_init(&sleep_lock, NULL);
            pthread_cond_init(&wake, NULL);
        }
        workers = 0;
        sleepers = 0;
        owner = me;
    }
    if (threads - 1 > D2_POOL_MAX) threads = D2_POOL_MAX + 1;
    while (workers < threads - 1) {
        pthread_t t;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        const int rc = pthread_create(&t, &attr, worker_main, NULL);
        pthread_attr_destroy(&attr);
        if (rc != 0) break; /* fewer threads: the caller takes the chunks they would have */
        workers++;
    }
}

static void run_job(int threads) {
    ensure_workers(threads);
    const uint64_t g = generation + 1;  /* only the caller (under call_lock) writes generation */
    __atomic_store_n(&done_chunks, 0, __ATOMIC_RELEASE);
    __atomic_store_n(&ticket, (g & 0xffffffffu) << 32, __ATOMIC_RELEASE); /* the job's fields are written */
    __atomic_store_n(&generation, g, __ATOMIC_SEQ_CST);
    if (__atomic_load_n(&sleepers, __ATOMIC_SEQ_CST) > 0) {
        pthread_mutex_lock(&sleep_lock);
        pthread_cond_broadcast(&wake);
        pthread_mutex_unlock(&sleep_lock);
    }
    run_chunks(g);
    while (__atomic_load_n(&done_chunks, __ATOMIC_ACQUIRE) < job.nchunks) sched_yield();
    /* closed before the next call rewrites the job: a thread that read this call's ticket and then the
       next call's chunk count fails its compare-and-swap instead of taking a chunk with the wrong edges */
    __atomic_store_n(&ticket, ((g & 0xffffffffu) << 32) | 0x7fffffffu, __ATOMIC_RELEASE);
}

/* Chunk edges over [0, rows): `nchunks` pieces on multiples of 16 rows (ROWS16 computes whole blocks). */
static void set_edges(int32_t rows, int32_t nchunks) {
    if (nchunks < 1) nchunks = 1;
    if (nchunks > D2_POOL_CHUNKS) nchunks = D2_POOL_CHUNKS;
    int32_t n = 0;
    job.edges[0] = 0;
    for (int32_t i = 1; i < nchunks; i++) {
        const int32_t e = (int32_t)(((int64_t)rows * i / nchunks) & ~15);
        if (e > job.edges[n]) job.edges[++n] = e;
    }
    if (rows > job.edges[n]) job.edges[++n] = rows;
    job.nchunks = n;
}

/* One call: `call`'s kernel and arguments over `rows` rows in `nchunks` chunks on `threads` threads. */
static void pool_call(const d2_job *call, int32_t rows, int32_t threads, int32_t nchunks) {
    pthread_mutex_lock(&call_lock);
    job = *call;
    set_edges(rows, nchunks);
    run_job(threads);
    pthread_mutex_unlock(&call_lock);
}

void d2_pool_gemv(const void *m, const void *q, float *y, int64_t ystride, int32_t rows, int64_t scratch_floats,
                  int32_t force_portable, int32_t threads, int32_t nchunks) {
    const d2_job call = {.kind = 0, .a = m, .b = q, .y = y, .ystride = ystride, .scratch_floats = scratch_floats,
                         .force_portable = force_portable};
    pool_call(&call, rows, threads, nchunks);
}

void d2_pool_dense(const void *W, int32_t dtype, const float *scale, int32_t cols, const float *x, int32_t ntok,
                   float *y, int64_t ystride, int32_t rows, int32_t force_portable, int32_t threads, int32_t nchunks) {
    const d2_job call = {.kind = 1, .a = W, .dtype = dtype, .scale = scale, .cols = cols, .x = x, .ntok = ntok,
                         .y = y, .ystride = ystride, .force_portable = force_portable};
    pool_call(&call, rows, threads, nchunks);
}

/* item(ctx, i) for i in [0, n), one item per chunk, on `threads` threads (the caller's included): work
   split by whole items (a step's small experts, each too small to split by rows). item must not call
   the pool itself (one call at a time). */
void d2_pool_items(void (*item)(void *ctx, int32_t i), void *ctx, int32_t n, int32_t threads) {
    if (n <= 0) return;
    if (threads <= 1 || n == 1) {
        for (int32_t i = 0; i < n; i++) item(ctx, i);
        return;
    }
    const int32_t nchunks = n < D2_POOL_CHUNKS ? n : D2_POOL_CHUNKS;
    pthread_mutex_lock(&call_lock);
    job = (d2_job){.kind = 2, .item = item, .ctx = ctx, .nchunks = nchunks};
    for (int32_t i = 0; i <= nchunks; i++) job.edges[i] = (int32_t)((int64_t)n * i / nchunks);
    run_job(threads);
    pthread_mutex_unlock(&call_lock);
}

/* Threads started besides callers in this process (tests: the pool really ran). */
int32_t d2_pool_workers(void) { return owner == getpid() ? workers : 0; }
