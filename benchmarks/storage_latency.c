/* Cloud-storage latency on local files, for benchmarks/input_latency.py.

   Preloaded (LD_PRELOAD) into a process, it delays the read(), pread() and
   pread64() calls of files whose path starts with $STORAGE_LATENCY_PREFIX
   that make a storage request (a GET of a byte range) by
   $STORAGE_LATENCY_MS milliseconds, before the read itself; the calling
   thread waits, as it waits on a blocking cloud-storage reader. Readers keep
   their own threads and buffers, so the requests in flight are theirs.
   Which calls are requests:
   - $STORAGE_LATENCY_BLOCK_MB unset or 0: every call, of the bytes it asks
     for (array_record's reader on gs://: one request per record read).
   - $STORAGE_LATENCY_BLOCK_MB = B: a file is read as TensorFlow's GCS file
     system reads it (BufferedGcsRandomAccessFile; its block is
     GCS_READ_CACHE_BLOCK_SIZE_MB, 64 by default): a read of at most B MiB
     that the file's last fetched block does not hold fetches the next B MiB
     from where that block ends (or from the read, when it lies outside):
     one request of B MiB; reads inside the block make none; a larger read
     is one request of its own.
   storage_latency_stats() gives the requests, their bytes and the most in
   flight at once since its last call.

   cc -O2 -shared -fPIC -o storage_latency.so storage_latency.c -ldl */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <limits.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

static atomic_long requests, bytes, in_flight, most_in_flight;

static long env_long(const char *name, double scale) {
  const char *value = getenv(name);
  return value ? (long)(atof(value) * scale) : 0;
}

static long latency_ns(void) {
  static long ns = -1;
  if (ns < 0) ns = env_long("STORAGE_LATENCY_MS", 1e6);
  return ns;
}

static long block_bytes(void) {
  static long block = -1;
  if (block < 0) block = env_long("STORAGE_LATENCY_BLOCK_MB", 1 << 20);
  return block;
}

/* Whether fd is a file under the prefix (a path lookup per call: microseconds
   against the milliseconds of the modelled request). */
static int on_storage(int fd) {
  const char *prefix = getenv("STORAGE_LATENCY_PREFIX");
  char link[64], path[PATH_MAX];
  if (!prefix || !*prefix) return 0;
  snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
  ssize_t n = readlink(link, path, sizeof path - 1);
  if (n < 0) return 0;
  path[n] = 0;
  return strncmp(path, prefix, strlen(prefix)) == 0;
}

/* One request of `n` bytes of fd from `offset`: the calling thread waits. */
static void request(int fd, off_t offset, long n) {
  struct stat st;
  if (fstat(fd, &st) == 0 && offset + n > st.st_size)
    n = st.st_size > offset ? st.st_size - offset : 0;
  long now = atomic_fetch_add(&in_flight, 1) + 1;
  long most = atomic_load(&most_in_flight);
  while (now > most &&
         !atomic_compare_exchange_weak(&most_in_flight, &most, now)) {
  }
  atomic_fetch_add(&requests, 1);
  atomic_fetch_add(&bytes, n);
  long ns = latency_ns();
  struct timespec wait = {ns / 1000000000L, ns % 1000000000L};
  while (nanosleep(&wait, &wait)) {
  }
  atomic_fetch_sub(&in_flight, 1);
}

/* The block each file descriptor last fetched, [start, end). Unlocked: in
   block mode each file is read by one thread at a time, as TFRecord files. */
#define MAX_FD 65536
static struct { off_t start, end; } fetched[MAX_FD];

/* The requests a read of `n` bytes of fd at `offset` makes. */
static void serve(int fd, off_t offset, size_t n) {
  long block = block_bytes();
  if (block <= 0 || fd < 0 || fd >= MAX_FD || (long)n > block) {
    request(fd, offset, (long)n);
    return;
  }
  off_t start = fetched[fd].start, end = fetched[fd].end;
  if (offset >= start && offset + (off_t)n <= end) return;
  start = offset >= start && offset < end ? end : offset;
  fetched[fd].start = start;
  fetched[fd].end = start + block;
  request(fd, start, block);
}

#define REAL(name)                 \
  static __typeof__(name) *real;   \
  if (!real) real = dlsym(RTLD_NEXT, #name)

ssize_t read(int fd, void *buf, size_t n) {
  REAL(read);
  if (on_storage(fd)) serve(fd, lseek(fd, 0, SEEK_CUR), n);
  return real(fd, buf, n);
}

ssize_t pread(int fd, void *buf, size_t n, off_t offset) {
  REAL(pread);
  if (on_storage(fd)) serve(fd, offset, n);
  return real(fd, buf, n, offset);
}

ssize_t pread64(int fd, void *buf, size_t n, off_t offset) {
  REAL(pread64);
  if (on_storage(fd)) serve(fd, offset, n);
  return real(fd, buf, n, offset);
}

int close(int fd) {
  REAL(close);
  if (fd >= 0 && fd < MAX_FD) fetched[fd].start = fetched[fd].end = 0;
  return real(fd);
}

/* {requests, bytes, most in flight} since the last call. */
void storage_latency_stats(long out[3]) {
  static long last_requests, last_bytes;
  long r = atomic_load(&requests), b = atomic_load(&bytes);
  out[0] = r - last_requests;
  out[1] = b - last_bytes;
  out[2] = atomic_exchange(&most_in_flight, atomic_load(&in_flight));
  last_requests = r;
  last_bytes = b;
}
