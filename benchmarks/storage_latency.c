/* Cloud-storage latency on local files, for benchmarks/input_latency.py.

   Preloaded (LD_PRELOAD) into a process, it delays every read(), pread() and
   pread64() of a file whose path starts with $STORAGE_LATENCY_PREFIX by
   $STORAGE_LATENCY_MS milliseconds, before the read itself: one such call is
   one storage request (a GET of that byte range), and the calling thread
   waits for it, as it waits on a blocking cloud-storage reader. Readers keep
   their own threads and buffers, so the requests in flight and the bytes per
   request are theirs. storage_latency_stats() gives the requests, their
   bytes and the most in flight at once since its last call.

   cc -O2 -shared -fPIC -o storage_latency.so storage_latency.c -ldl */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <limits.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

static atomic_long requests, bytes, in_flight, most_in_flight;

static long latency_ns(void) {
  static long ns = -1;
  if (ns < 0) {
    const char *ms = getenv("STORAGE_LATENCY_MS");
    ns = ms ? (long)(atof(ms) * 1e6) : 0;
  }
  return ns;
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

static void request_starts(void) {
  long now = atomic_fetch_add(&in_flight, 1) + 1;
  long most = atomic_load(&most_in_flight);
  while (now > most &&
         !atomic_compare_exchange_weak(&most_in_flight, &most, now)) {
  }
  atomic_fetch_add(&requests, 1);
  long ns = latency_ns();
  struct timespec wait = {ns / 1000000000L, ns % 1000000000L};
  while (nanosleep(&wait, &wait)) {
  }
}

static ssize_t request_ends(ssize_t got) {
  if (got > 0) atomic_fetch_add(&bytes, got);
  atomic_fetch_sub(&in_flight, 1);
  return got;
}

#define REAL(name)                 \
  static __typeof__(name) *real;   \
  if (!real) real = dlsym(RTLD_NEXT, #name)

ssize_t read(int fd, void *buf, size_t n) {
  REAL(read);
  if (!on_storage(fd)) return real(fd, buf, n);
  request_starts();
  return request_ends(real(fd, buf, n));
}

ssize_t pread(int fd, void *buf, size_t n, off_t offset) {
  REAL(pread);
  if (!on_storage(fd)) return real(fd, buf, n, offset);
  request_starts();
  return request_ends(real(fd, buf, n, offset));
}

ssize_t pread64(int fd, void *buf, size_t n, off_t offset) {
  REAL(pread64);
  if (!on_storage(fd)) return real(fd, buf, n, offset);
  request_starts();
  return request_ends(real(fd, buf, n, offset));
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
