/*
 * A fake libnvidia-ml.so.1 for dpkit's tests: the real pynvml binding loads it and sees the GPUs
 * described by the file named in $FAKENVML_CONFIG (written by fakenvml/__init__.py).
 *
 * The description is re-read whenever the file changes, so a test can lose a GPU, deliver an
 * XID, make a call hang (until the line is removed) or bring a GPU back while the code under
 * test is running. Line format, one record per line:
 *
 *   init RC                    nvmlInit returns RC (9: driver not loaded)
 *   driver VERSION             cuda INT
 *   hang FUNCTION GPU          FUNCTION blocks while this line exists (GPU -1: any GPU)
 *   gpu UUID MINOR BUSID MEMORY MIGCUR MIGPEND LOST NAME...   (index = order of gpu lines)
 *   mig GPU UUID GI CI GISLICES CISLICES MEMMB
 *   nvlink GPU REMOTE_BUSID    one line per active link, in link order
 *   topo GPU GPU LEVEL         nvmlDeviceGetTopologyCommonAncestor level
 *   event SEQ GPU TYPE DATA GI CI
 *   count N                    nvmlDeviceGetCount answers N instead of the number of gpu lines
 *
 * Build: gcc -shared -fPIC -Wl,-soname,libnvidia-ml.so.1 -o libnvidia-ml.so.1 fakenvml.c -lpthread
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#define MAX_GPUS 64
#define MAX_MIGS 8
#define MAX_LINKS 18
#define MAX_EVENTS 256
#define MAX_HANGS 16

enum {
    OK = 0, UNINITIALIZED = 1, INVALID_ARGUMENT = 2, NOT_SUPPORTED = 3, NOT_FOUND = 6,
    INSUFFICIENT_SIZE = 7, DRIVER_NOT_LOADED = 9, TIMEOUT = 10, GPU_IS_LOST = 15, UNKNOWN = 999
};

typedef struct { char uuid[96]; unsigned gi, ci, gi_slices, ci_slices; unsigned long long mem_mb; } mig_t;

typedef struct {
    char uuid[96], name[96], bus[32];
    unsigned minor, mig_cur, mig_pend, lost, nmigs, nlinks, no_mig;
    unsigned long long memory;
    mig_t migs[MAX_MIGS];
    char links[MAX_LINKS][32];
    int topo[MAX_GPUS];
} gpu_t;

typedef struct { unsigned long long seq, type, data; int gpu; unsigned gi, ci; } event_t;
typedef struct { char fn[64]; int gpu; } hang_t;

typedef struct {
    int init_rc, ngpus, nevents, nhangs, cuda, count_set;
    unsigned count;
    char driver[80];
    gpu_t gpus[MAX_GPUS];
    event_t events[MAX_EVENTS];
    hang_t hangs[MAX_HANGS];
} state_t;

/* A handle is a pointer to one of these: a full GPU (mig < 0) or a MIG device. */
typedef struct { int gpu, mig; } handle_t;

typedef struct { unsigned long long masks[MAX_GPUS]; unsigned long long last_seq; } eventset_t;

typedef struct {
    handle_t *device;
    unsigned long long eventType, eventData;
    unsigned gpuInstanceId, computeInstanceId;
} event_data_t;

typedef struct {
    char busIdLegacy[16];
    unsigned domain, bus, device, pciDeviceId, pciSubSystemId;
    char busId[32];
} pci_t;

typedef struct {
    unsigned multiprocessorCount, sharedCopyEngineCount, sharedDecoderCount, sharedEncoderCount,
        sharedJpegCount, sharedOfaCount, gpuInstanceSliceCount, computeInstanceSliceCount;
    unsigned long long memorySizeMB;
} attrs_t;

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static state_t st;
static struct timespec loaded_mtime;
static ino_t loaded_ino;
static off_t loaded_size = -1;
static int refcount;
static handle_t gpu_handles[MAX_GPUS];
static handle_t mig_handles[MAX_GPUS][MAX_MIGS];

static void parse_line(state_t *s, char *line) {
    char word[16];
    int n = 0;
    if (sscanf(line, "%15s%n", word, &n) != 1) return;
    char *rest = line + n;
    if (!strcmp(word, "init")) {
        sscanf(rest, "%d", &s->init_rc);
    } else if (!strcmp(word, "driver")) {
        sscanf(rest, "%79s", s->driver);
    } else if (!strcmp(word, "count")) {
        if (sscanf(rest, "%u", &s->count) == 1) s->count_set = 1;
    } else if (!strcmp(word, "cuda")) {
        sscanf(rest, "%d", &s->cuda);
    } else if (!strcmp(word, "hang") && s->nhangs < MAX_HANGS) {
        hang_t *h = &s->hangs[s->nhangs];
        if (sscanf(rest, "%63s %d", h->fn, &h->gpu) == 2) s->nhangs++;
    } else if (!strcmp(word, "gpu") && s->ngpus < MAX_GPUS) {
        gpu_t *g = &s->gpus[s->ngpus];
        memset(g, 0, sizeof(*g));
        for (int i = 0; i < MAX_GPUS; i++) g->topo[i] = 50;
        int off = 0;
        if (sscanf(rest, "%95s %u %31s %llu %u %u %u %n", g->uuid, &g->minor, g->bus, &g->memory,
                   &g->mig_cur, &g->mig_pend, &g->lost, &off) >= 7) {
            char *name = rest + off;
            name[strcspn(name, "\n")] = 0;
            snprintf(g->name, sizeof(g->name), "%s", name);
            s->ngpus++;
        }
    } else if (!strcmp(word, "nomig")) {  /* a GPU without MIG support (GetMigMode: NOT_SUPPORTED) */
        int gi;
        if (sscanf(rest, "%d", &gi) == 1 && gi >= 0 && gi < s->ngpus) s->gpus[gi].no_mig = 1;
    } else if (!strcmp(word, "mig")) {
        int gi;
        mig_t m;
        if (sscanf(rest, "%d %95s %u %u %u %u %llu", &gi, m.uuid, &m.gi, &m.ci, &m.gi_slices,
                   &m.ci_slices, &m.mem_mb) == 7 && gi >= 0 && gi < s->ngpus && s->gpus[gi].nmigs < MAX_MIGS)
            s->gpus[gi].migs[s->gpus[gi].nmigs++] = m;
    } else if (!strcmp(word, "nvlink")) {
        int gi;
        char bus[32];
        if (sscanf(rest, "%d %31s", &gi, bus) == 2 && gi >= 0 && gi < s->ngpus && s->gpus[gi].nlinks < MAX_LINKS)
            snprintf(s->gpus[gi].links[s->gpus[gi].nlinks++], 32, "%s", bus);
    } else if (!strcmp(word, "topo")) {
        int a, b, level;
        if (sscanf(rest, "%d %d %d", &a, &b, &level) == 3 && a >= 0 && b >= 0 && a < s->ngpus && b < s->ngpus) {
            s->gpus[a].topo[b] = level;
            s->gpus[b].topo[a] = level;
        }
    } else if (!strcmp(word, "event") && s->nevents < MAX_EVENTS) {
        event_t *e = &s->events[s->nevents];
        if (sscanf(rest, "%llu %d %llu %llu %u %u", &e->seq, &e->gpu, &e->type, &e->data, &e->gi, &e->ci) == 6)
            s->nevents++;
    }
}

/* Re-read the description when the file changed; call with the lock held. */
static void reload(void) {
    const char *path = getenv("FAKENVML_CONFIG");
    struct stat sb;
    if (!path || stat(path, &sb) != 0) {
        if (loaded_size != -2) {
            memset(&st, 0, sizeof(st));
            loaded_size = -2;
        }
        return;
    }
    if (sb.st_mtim.tv_sec == loaded_mtime.tv_sec && sb.st_mtim.tv_nsec == loaded_mtime.tv_nsec &&
        sb.st_ino == loaded_ino && sb.st_size == loaded_size)
        return;
    FILE *f = fopen(path, "r");
    if (!f) return;
    static state_t fresh;
    memset(&fresh, 0, sizeof(fresh));
    snprintf(fresh.driver, sizeof(fresh.driver), "550.54.15");
    fresh.cuda = 12040;
    char line[512];
    while (fgets(line, sizeof(line), f)) parse_line(&fresh, line);
    fclose(f);
    st = fresh;
    loaded_mtime = sb.st_mtim;
    loaded_ino = sb.st_ino;
    loaded_size = sb.st_size;
}

static void nap_ms(long ms) {
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

static int hang_matches(const char *fn, int gpu) {
    for (int i = 0; i < st.nhangs; i++)
        if (!strcmp(st.hangs[i].fn, fn) && (st.hangs[i].gpu < 0 || st.hangs[i].gpu == gpu)) return 1;
    return 0;
}

/* Take the lock, blocking first for as long as a matching 'hang' line exists. */
static void enter(const char *fn, int gpu) {
    pthread_mutex_lock(&lock);
    reload();
    while (hang_matches(fn, gpu)) {
        pthread_mutex_unlock(&lock);
        nap_ms(20);
        pthread_mutex_lock(&lock);
        reload();
    }
}

static int leave(int rc) {
    pthread_mutex_unlock(&lock);
    return rc;
}

static int gpu_of(handle_t *h) {
    if (!h || h->gpu < 0 || h->gpu >= MAX_GPUS) return -1;
    return h->gpu;
}

/* Validate a handle with the lock held: the GPU must exist and not be lost. */
static int check(handle_t *h) {
    if (refcount <= 0) return UNINITIALIZED;
    int g = gpu_of(h);
    if (g < 0) return INVALID_ARGUMENT;
    if (g >= st.ngpus) return GPU_IS_LOST;
    if (st.gpus[g].lost) return GPU_IS_LOST;
    if (h->mig >= 0 && (unsigned)h->mig >= st.gpus[g].nmigs) return NOT_FOUND;
    return OK;
}

static int copy_str(char *dst, unsigned len, const char *src) {
    if (strlen(src) + 1 > len) return INSUFFICIENT_SIZE;
    snprintf(dst, len, "%s", src);
    return OK;
}

static void fill_pci(pci_t *p, const char *bus) {
    memset(p, 0, sizeof(*p));
    snprintf(p->busId, sizeof(p->busId), "%s", bus);
    snprintf(p->busIdLegacy, sizeof(p->busIdLegacy), "%s", bus + (strlen(bus) > 12 ? 4 : 0));
    unsigned dom = 0, b = 0, d = 0;
    sscanf(bus, "%x:%x:%x", &dom, &b, &d);
    p->domain = dom;
    p->bus = b;
    p->device = d;
    p->pciDeviceId = 0x233010de;
}

/* ---- library ------------------------------------------------------------------------------ */

int nvmlInitWithFlags(unsigned flags) {
    (void)flags;
    enter("nvmlInit", -1);
    if (st.init_rc) return leave(st.init_rc);
    refcount++;
    return leave(OK);
}
int nvmlInit_v2(void) { return nvmlInitWithFlags(0); }
int nvmlInit(void) { return nvmlInitWithFlags(0); }

int nvmlShutdown(void) {
    pthread_mutex_lock(&lock);
    if (refcount <= 0) return leave(UNINITIALIZED);
    refcount--;
    return leave(OK);
}

const char *nvmlErrorString(int rc) {
    switch (rc) {
    case OK: return "Success";
    case UNINITIALIZED: return "Uninitialized";
    case INVALID_ARGUMENT: return "Invalid Argument";
    case NOT_SUPPORTED: return "Not Supported";
    case NOT_FOUND: return "Not Found";
    case INSUFFICIENT_SIZE: return "Insufficient Size";
    case DRIVER_NOT_LOADED: return "Driver Not Loaded";
    case TIMEOUT: return "Timeout";
    case GPU_IS_LOST: return "GPU is lost";
    default: return "Unknown Error";
    }
}

int nvmlSystemGetDriverVersion(char *version, unsigned len) {
    enter("nvmlSystemGetDriverVersion", -1);
    if (refcount <= 0) return leave(UNINITIALIZED);
    return leave(copy_str(version, len, st.driver));
}

int nvmlSystemGetNVMLVersion(char *version, unsigned len) {
    enter("nvmlSystemGetNVMLVersion", -1);
    return leave(copy_str(version, len, "12.550.54.15"));
}

int nvmlSystemGetCudaDriverVersion(int *version) {
    enter("nvmlSystemGetCudaDriverVersion", -1);
    if (refcount <= 0) return leave(UNINITIALIZED);
    *version = st.cuda;
    return leave(OK);
}
int nvmlSystemGetCudaDriverVersion_v2(int *version) { return nvmlSystemGetCudaDriverVersion(version); }

/* ---- devices ------------------------------------------------------------------------------ */

int nvmlDeviceGetCount_v2(unsigned *count) {
    enter("nvmlDeviceGetCount", -1);
    if (refcount <= 0) return leave(UNINITIALIZED);
    *count = st.count_set ? st.count : (unsigned)st.ngpus;
    return leave(OK);
}
int nvmlDeviceGetCount(unsigned *count) { return nvmlDeviceGetCount_v2(count); }

int nvmlDeviceGetHandleByIndex_v2(unsigned index, handle_t **out) {
    enter("nvmlDeviceGetHandleByIndex", (int)index);
    if (refcount <= 0) return leave(UNINITIALIZED);
    if (index >= (unsigned)st.ngpus) return leave(INVALID_ARGUMENT);
    if (st.gpus[index].lost) return leave(GPU_IS_LOST);
    gpu_handles[index].gpu = (int)index;
    gpu_handles[index].mig = -1;
    *out = &gpu_handles[index];
    return leave(OK);
}
int nvmlDeviceGetHandleByIndex(unsigned index, handle_t **out) { return nvmlDeviceGetHandleByIndex_v2(index, out); }

int nvmlDeviceGetHandleByUUID(const char *uuid, handle_t **out) {
    pthread_mutex_lock(&lock);
    reload();
    int found = -1, mig = -1;
    for (int g = 0; g < st.ngpus && found < 0; g++) {
        if (!strcmp(st.gpus[g].uuid, uuid)) found = g;
        for (unsigned m = 0; m < st.gpus[g].nmigs && found < 0; m++)
            if (!strcmp(st.gpus[g].migs[m].uuid, uuid)) found = g, mig = (int)m;
    }
    pthread_mutex_unlock(&lock);
    enter("nvmlDeviceGetHandleByUUID", found);
    if (refcount <= 0) return leave(UNINITIALIZED);
    if (found < 0 || found >= st.ngpus) return leave(NOT_FOUND);
    if (st.gpus[found].lost) return leave(GPU_IS_LOST);
    handle_t *h = mig < 0 ? &gpu_handles[found] : &mig_handles[found][mig];
    h->gpu = found;
    h->mig = mig;
    *out = h;
    return leave(OK);
}

int nvmlDeviceGetUUID(handle_t *h, char *uuid, unsigned len) {
    enter("nvmlDeviceGetUUID", gpu_of(h));
    int rc = check(h);
    if (rc) return leave(rc);
    gpu_t *g = &st.gpus[h->gpu];
    return leave(copy_str(uuid, len, h->mig < 0 ? g->uuid : g->migs[h->mig].uuid));
}

int nvmlDeviceGetName(handle_t *h, char *name, unsigned len) {
    enter("nvmlDeviceGetName", gpu_of(h));
    int rc = check(h);
    if (rc) return leave(rc);
    return leave(copy_str(name, len, st.gpus[h->gpu].name));
}

int nvmlDeviceGetIndex(handle_t *h, unsigned *index) {
    enter("nvmlDeviceGetIndex", gpu_of(h));
    int rc = check(h);
    if (rc) return leave(rc);
    *index = (unsigned)h->gpu;
    return leave(OK);
}

int nvmlDeviceGetMinorNumber(handle_t *h, unsigned *minor) {
    enter("nvmlDeviceGetMinorNumber", gpu_of(h));
    int rc = check(h);
    if (rc) return leave(rc);
    *minor = st.gpus[h->gpu].minor;
    return leave(OK);
}

int nvmlDeviceGetMemoryInfo(handle_t *h, unsigned long long *mem) {
    enter("nvmlDeviceGetMemoryInfo", gpu_of(h));
    int rc = check(h);
    if (rc) return leave(rc);
    unsigned long long total = h->mig < 0 ? st.gpus[h->gpu].memory
                                          : st.gpus[h->gpu].migs[h->mig].mem_mb * 1024ULL * 1024ULL;
    mem[0] = total;     /* total */
    mem[1] = total;     /* free */
    mem[2] = 0;         /* used */
    return leave(OK);
}

int nvmlDeviceGetPciInfo_v3(handle_t *h, pci_t *pci) {
    enter("nvmlDeviceGetPciInfo", gpu_of(h));
    int rc = check(h);
    if (rc) return leave(rc);
    fill_pci(pci, st.gpus[h->gpu].bus);
    return leave(OK);
}

int nvmlDeviceGetMigMode(handle_t *h, unsigned *current, unsigned *pending) {
    enter("nvmlDeviceGetMigMode", gpu_of(h));
    int rc = check(h);
    if (rc) return leave(rc);
    if (st.gpus[h->gpu].no_mig) return leave(NOT_SUPPORTED);
    *current = st.gpus[h->gpu].mig_cur;
    *pending = st.gpus[h->gpu].mig_pend;
    return leave(OK);
}

int nvmlDeviceGetMaxMigDeviceCount(handle_t *h, unsigned *count) {
    enter("nvmlDeviceGetMaxMigDeviceCount", gpu_of(h));
    int rc = check(h);
    if (rc) return leave(rc);
    *count = MAX_MIGS;
    return leave(OK);
}

int nvmlDeviceGetMigDeviceHandleByIndex(handle_t *h, unsigned index, handle_t **out) {
    enter("nvmlDeviceGetMigDeviceHandleByIndex", gpu_of(h));
    int rc = check(h);
    if (rc) return leave(rc);
    gpu_t *g = &st.gpus[h->gpu];
    if (!g->mig_cur) return leave(INVALID_ARGUMENT);
    if (index >= MAX_MIGS) return leave(INVALID_ARGUMENT);
    if (index >= g->nmigs) return leave(NOT_FOUND);
    handle_t *m = &mig_handles[h->gpu][index];
    m->gpu = h->gpu;
    m->mig = (int)index;
    *out = m;
    return leave(OK);
}

int nvmlDeviceIsMigDeviceHandle(handle_t *h, unsigned *is_mig) {
    *is_mig = h && h->mig >= 0;
    return OK;
}

int nvmlDeviceGetDeviceHandleFromMigDeviceHandle(handle_t *h, handle_t **out) {
    enter("nvmlDeviceGetDeviceHandleFromMigDeviceHandle", gpu_of(h));
    int rc = check(h);
    if (rc) return leave(rc);
    if (h->mig < 0) return leave(INVALID_ARGUMENT);
    *out = &gpu_handles[h->gpu];
    gpu_handles[h->gpu].gpu = h->gpu;
    gpu_handles[h->gpu].mig = -1;
    return leave(OK);
}

int nvmlDeviceGetGpuInstanceId(handle_t *h, unsigned *id) {
    enter("nvmlDeviceGetGpuInstanceId", gpu_of(h));
    int rc = check(h);
    if (rc) return leave(rc);
    if (h->mig < 0) return leave(INVALID_ARGUMENT);
    *id = st.gpus[h->gpu].migs[h->mig].gi;
    return leave(OK);
}

int nvmlDeviceGetComputeInstanceId(handle_t *h, unsigned *id) {
    enter("nvmlDeviceGetComputeInstanceId", gpu_of(h));
    int rc = check(h);
    if (rc) return leave(rc);
    if (h->mig < 0) return leave(INVALID_ARGUMENT);
    *id = st.gpus[h->gpu].migs[h->mig].ci;
    return leave(OK);
}

int nvmlDeviceGetAttributes_v2(handle_t *h, attrs_t *attrs) {
    enter("nvmlDeviceGetAttributes", gpu_of(h));
    int rc = check(h);
    if (rc) return leave(rc);
    if (h->mig < 0) return leave(NOT_SUPPORTED);
    mig_t *m = &st.gpus[h->gpu].migs[h->mig];
    memset(attrs, 0, sizeof(*attrs));
    attrs->multiprocessorCount = 14 * m->ci_slices;
    attrs->gpuInstanceSliceCount = m->gi_slices;
    attrs->computeInstanceSliceCount = m->ci_slices;
    attrs->memorySizeMB = m->mem_mb;
    return leave(OK);
}

int nvmlDeviceGetTopologyCommonAncestor(handle_t *a, handle_t *b, int *level) {
    enter("nvmlDeviceGetTopologyCommonAncestor", gpu_of(a));
    int rc = check(a);
    if (!rc) rc = check(b);
    if (rc) return leave(rc);
    *level = a->gpu == b->gpu ? 0 : st.gpus[a->gpu].topo[b->gpu];
    return leave(OK);
}

int nvmlDeviceGetNvLinkState(handle_t *h, unsigned link, unsigned *active) {
    enter("nvmlDeviceGetNvLinkState", gpu_of(h));
    int rc = check(h);
    if (rc) return leave(rc);
    gpu_t *g = &st.gpus[h->gpu];
    if (!g->nlinks) return leave(NOT_SUPPORTED);
    if (link >= g->nlinks) return leave(INVALID_ARGUMENT);
    *active = 1;
    return leave(OK);
}

int nvmlDeviceGetNvLinkRemotePciInfo_v2(handle_t *h, unsigned link, pci_t *pci) {
    enter("nvmlDeviceGetNvLinkRemotePciInfo", gpu_of(h));
    int rc = check(h);
    if (rc) return leave(rc);
    gpu_t *g = &st.gpus[h->gpu];
    if (!g->nlinks) return leave(NOT_SUPPORTED);
    if (link >= g->nlinks) return leave(INVALID_ARGUMENT);
    fill_pci(pci, g->links[link]);
    return leave(OK);
}

/* ---- events ------------------------------------------------------------------------------- */

#define SUPPORTED_EVENTS 0x0BULL /* single-bit ECC, double-bit ECC, XID critical error */

int nvmlEventSetCreate(eventset_t **out) {
    enter("nvmlEventSetCreate", -1);
    if (refcount <= 0) return leave(UNINITIALIZED);
    eventset_t *set = calloc(1, sizeof(*set));
    if (!set) return leave(UNKNOWN);
    for (int i = 0; i < st.nevents; i++)  /* only events that happen after this point */
        if (st.events[i].seq > set->last_seq) set->last_seq = st.events[i].seq;
    *out = set;
    return leave(OK);
}

int nvmlDeviceGetSupportedEventTypes(handle_t *h, unsigned long long *types) {
    enter("nvmlDeviceGetSupportedEventTypes", gpu_of(h));
    int rc = check(h);
    if (rc) return leave(rc);
    *types = SUPPORTED_EVENTS;
    return leave(OK);
}

int nvmlDeviceRegisterEvents(handle_t *h, unsigned long long types, eventset_t *set) {
    enter("nvmlDeviceRegisterEvents", gpu_of(h));
    int rc = check(h);
    if (rc) return leave(rc);
    if (!set) return leave(INVALID_ARGUMENT);
    if (types & ~SUPPORTED_EVENTS) return leave(NOT_SUPPORTED);
    set->masks[h->gpu] |= types;
    return leave(OK);
}

int nvmlEventSetWait_v2(eventset_t *set, event_data_t *data, unsigned timeout_ms) {
    struct timespec start, now;
    clock_gettime(CLOCK_MONOTONIC, &start);
    for (;;) {
        enter("nvmlEventSetWait", -1);
        if (refcount <= 0) return leave(UNINITIALIZED);
        const event_t *best = NULL;
        for (int i = 0; i < st.nevents; i++) {
            const event_t *e = &st.events[i];
            if (e->seq <= set->last_seq || e->gpu < 0 || e->gpu >= st.ngpus) continue;
            if (!(set->masks[e->gpu] & e->type)) continue;
            if (!best || e->seq < best->seq) best = e;
        }
        if (best) {
            set->last_seq = best->seq;
            gpu_handles[best->gpu].gpu = best->gpu;
            gpu_handles[best->gpu].mig = -1;
            data->device = &gpu_handles[best->gpu];
            data->eventType = best->type;
            data->eventData = best->data;
            data->gpuInstanceId = best->gi;
            data->computeInstanceId = best->ci;
            return leave(OK);
        }
        pthread_mutex_unlock(&lock);
        clock_gettime(CLOCK_MONOTONIC, &now);
        long elapsed = (now.tv_sec - start.tv_sec) * 1000L + (now.tv_nsec - start.tv_nsec) / 1000000L;
        if (elapsed >= (long)timeout_ms) return TIMEOUT;
        nap_ms(10);
    }
}
int nvmlEventSetWait(eventset_t *set, event_data_t *data, unsigned timeout_ms) {
    return nvmlEventSetWait_v2(set, data, timeout_ms);
}

int nvmlEventSetFree(eventset_t *set) {
    free(set);
    return OK;
}

/* ---- compute mode (MPS) ---------------------------------------------------------------------- */
/* Kept in memory per GPU; every change is also appended to "$FAKENVML_CONFIG.compute" as
   "<uuid> <mode>" so a test can see what another process (the MPS daemon) set. */
static unsigned compute_modes[MAX_GPUS];

int nvmlDeviceSetComputeMode(handle_t *h, unsigned mode) {
    enter("nvmlDeviceSetComputeMode", gpu_of(h));
    int rc = check(h);
    if (rc) return leave(rc);
    if (h->mig >= 0 || mode > 3) return leave(INVALID_ARGUMENT);
    compute_modes[h->gpu] = mode;
    const char *cfg = getenv("FAKENVML_CONFIG");
    if (cfg) {
        char path[4096];
        snprintf(path, sizeof(path), "%s.compute", cfg);
        FILE *f = fopen(path, "a");
        if (f) {
            fprintf(f, "%s %u\n", st.gpus[h->gpu].uuid, mode);
            fclose(f);
        }
    }
    return leave(OK);
}

int nvmlDeviceGetComputeMode(handle_t *h, unsigned *mode) {
    enter("nvmlDeviceGetComputeMode", gpu_of(h));
    int rc = check(h);
    if (rc) return leave(rc);
    *mode = compute_modes[h->gpu];
    return leave(OK);
}
