/* A greedy SCHED_DEADLINE server standing in for a vCPU, for bench/supply.
 *
 *   greedy server RUNTIME_NS DEADLINE_NS PERIOD_NS DURATION_NS GAP_NS OUT [CPU]
 *   greedy hog CPU
 *
 * server: put itself under SCHED_DEADLINE with the exact parameters (raw
 * sched_setattr: glibc has no wrapper), print "READY <tid>" (or "ERR <what>
 * <errno> <message>" and exit 2: an EBUSY from the kernel's admission is a
 * result to report, never to ignore), wait for one byte on stdin, then spin
 * for DURATION_NS reading CLOCK_MONOTONIC.  Every step between two readings
 * longer than GAP_NS is a time off the CPU (preempted, throttled, or an
 * interrupt) and is recorded; shorter steps above 500 ns are only summed, so
 * the trace's error is known.  At the end it writes OUT and *exits while
 * still SCHED_DEADLINE*: a sleeping deadline thread switched back to
 * SCHED_OTHER would leak its bandwidth from the kernel's admission total
 * (DESIGN.md §2), an exiting one returns it.
 *
 * OUT, text: one header line of key=value pairs, then one line per gap:
 * "start end switches cpu" (ns relative to the first reading).  At the end
 * of every gap the thread reads its context-switch count (getrusage
 * RUSAGE_THREAD, which does not account the deadline runtime) and its CPU
 * (getcpu, vDSO), so every gap is a switch (switches > 0: the scheduler took
 * the CPU) or an interruption (an interrupt, or time the hypervisor stole,
 * while the thread stayed current).  A switch that happens inside that read
 * (the tick throttles the thread at the syscall's exit) is counted after the
 * read, so it lands on the gap that holds it.  The thread does NOT read its
 * CPU clock per gap: CLOCK_THREAD_CPUTIME_ID and /proc/.../schedstat run
 * update_curr(), which enforces the deadline runtime right there and would
 * cut the tick's overrun short (measured: a throttle inside the read).  The
 * kernel's totals (sum_exec_runtime from /proc/thread-self/schedstat,
 * context switches from /proc/thread-self/status) over the spin are in the
 * header.
 *
 * hog: a SCHED_OTHER busy loop pinned to CPU, for background load.
 *
 * Both die with their parent (PR_SET_PDEATHSIG), so an interrupted bench
 * leaves no deadline thread behind.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#ifndef SCHED_DEADLINE
#define SCHED_DEADLINE 6
#endif

/* uapi struct sched_attr, SCHED_ATTR_SIZE_VER0 (include/uapi/linux/sched/types.h). */
struct sched_attr_v0 {
	uint32_t size;
	uint32_t sched_policy;
	uint64_t sched_flags;
	int32_t sched_nice;
	uint32_t sched_priority;
	uint64_t sched_runtime;
	uint64_t sched_deadline;
	uint64_t sched_period;
};

static inline int64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static int64_t parse_i64(const char *s, const char *what)
{
	char *end;
	errno = 0;
	long long v = strtoll(s, &end, 10);
	if (errno || *end || v < 0) {
		printf("ERR usage %d %s is not a non-negative integer: %s\n", EINVAL, what, s);
		exit(64);
	}
	return v;
}

static int pin(int cpu)
{
	cpu_set_t set;
	CPU_ZERO(&set);
	CPU_SET(cpu, &set);
	if (sched_setaffinity(0, sizeof set, &set)) {
		printf("ERR sched_setaffinity %d %s\n", errno, strerror(errno));
		return -1;
	}
	return 0;
}

/* sum_exec_runtime in ns, from /proc/thread-self/schedstat ("run wait slices"). */
static long long exec_ns(void)
{
	long long run = -1;
	FILE *f = fopen("/proc/thread-self/schedstat", "r");
	if (f) {
		if (fscanf(f, "%lld", &run) != 1)
			run = -1;
		fclose(f);
	}
	return run;
}

/* Involuntary and voluntary context switches, from /proc/thread-self/status. */
static void ctxsw(long long *vol, long long *invol)
{
	char line[256];
	*vol = *invol = -1;
	FILE *f = fopen("/proc/thread-self/status", "r");
	if (!f)
		return;
	while (fgets(line, sizeof line, f)) {
		sscanf(line, "voluntary_ctxt_switches: %lld", vol);
		sscanf(line, "nonvoluntary_ctxt_switches: %lld", invol);
	}
	fclose(f);
}

static inline int64_t nsw(void)
{
	struct rusage ru;
	if (getrusage(RUSAGE_THREAD, &ru))
		return -1;
	return (int64_t)ru.ru_nvcsw + ru.ru_nivcsw;
}

static int hog(int argc, char **argv)
{
	if (argc != 3) {
		printf("ERR usage %d greedy hog CPU\n", EINVAL);
		return 64;
	}
	if (pin((int)parse_i64(argv[2], "CPU")))
		return 3;
	printf("READY %ld\n", (long)syscall(SYS_gettid));
	fflush(stdout);
	for (volatile uint64_t i = 0;; i++)
		;
}

int main(int argc, char **argv)
{
	setvbuf(stdout, NULL, _IOLBF, 0);
	prctl(PR_SET_PDEATHSIG, SIGKILL);
	if (getppid() == 1)
		return 1; /* the parent is already gone */
	if (argc >= 2 && !strcmp(argv[1], "hog"))
		return hog(argc, argv);
	if (argc < 8 || argc > 9 || strcmp(argv[1], "server")) {
		printf("ERR usage %d greedy server RUNTIME_NS DEADLINE_NS PERIOD_NS DURATION_NS "
		       "GAP_NS OUT [CPU] | greedy hog CPU\n", EINVAL);
		return 64;
	}
	int64_t runtime = parse_i64(argv[2], "RUNTIME_NS");
	int64_t deadline = parse_i64(argv[3], "DEADLINE_NS");
	int64_t period = parse_i64(argv[4], "PERIOD_NS");
	int64_t duration = parse_i64(argv[5], "DURATION_NS");
	int64_t gap = parse_i64(argv[6], "GAP_NS");
	const char *out = argv[7];

	/* Room for one gap every 5 us, allocated and touched before the run so
	 * that no page fault lands inside it. */
	enum { W = 4 }; /* start, end, switches, cpu */
	size_t cap = (size_t)(duration / 5000) + 4096;
	int64_t *buf = malloc(cap * W * sizeof *buf);
	if (!buf) {
		printf("ERR malloc %d %s\n", ENOMEM, strerror(ENOMEM));
		return 2;
	}
	memset(buf, 0, cap * W * sizeof *buf);
	mlockall(MCL_CURRENT | MCL_FUTURE); /* best effort */

	if (argc == 9 && pin((int)parse_i64(argv[8], "CPU")))
		return 3;

	struct sched_attr_v0 attr = {
		.size = sizeof attr, .sched_policy = SCHED_DEADLINE,
		.sched_runtime = (uint64_t)runtime, .sched_deadline = (uint64_t)deadline,
		.sched_period = (uint64_t)period,
	};
	if (syscall(SYS_sched_setattr, 0, &attr, 0)) {
		int e = errno;
		printf("ERR sched_setattr %d %s\n", e, strerror(e));
		return 2; /* never was SCHED_DEADLINE: nothing to leak */
	}
	printf("READY %ld\n", (long)syscall(SYS_gettid));

	char go;
	if (read(0, &go, 1) != 1)
		return 1; /* the parent gave up: exit now, still SCHED_DEADLINE */

	long long vol0, inv0, vol1, inv1;
	ctxsw(&vol0, &inv0);
	long long exec0 = exec_ns();

	size_t n = 0;
	int overflow = 0;
	long long small_n = 0, small_sum = 0, small_max = 0;
	int64_t s_prev = nsw();
	int64_t t0 = now_ns(), last = t0, end = t0 + duration, t;
	do {
		t = now_ns();
		int64_t d = t - last;
		if (d > gap) {
			if (n < cap) {
				int64_t sw = nsw();
				buf[W * n] = last - t0;
				buf[W * n + 1] = t - t0;
				buf[W * n + 2] = sw - s_prev;
				buf[W * n + 3] = sched_getcpu();
				s_prev = sw;
				n++;
			} else {
				overflow = 1;
				break; /* the trace ends at the last recorded step */
			}
		} else if (d > 500) {
			small_n++;
			small_sum += d;
			if (d > small_max)
				small_max = d;
		}
		last = t;
	} while (t < end);
	int64_t span = last - t0;
	int64_t tail_switches = nsw() - s_prev;

	long long exec1 = exec_ns();
	ctxsw(&vol1, &inv1);

	FILE *f = fopen(out, "w");
	if (!f) {
		printf("ERR fopen %d %s\n", errno, strerror(errno));
		return 2;
	}
	fprintf(f, "runtime_ns=%lld deadline_ns=%lld period_ns=%lld span_ns=%lld gap_ns=%lld "
		"gaps=%zu overflow=%d small_n=%lld small_sum_ns=%lld small_max_ns=%lld "
		"exec_ns=%lld voluntary=%lld involuntary=%lld tail_switches=%lld\n",
		(long long)runtime, (long long)deadline, (long long)period, (long long)span,
		(long long)gap, n, overflow, small_n, small_sum, small_max,
		(exec0 >= 0 && exec1 >= 0) ? exec1 - exec0 : -1LL,
		(vol0 >= 0 && vol1 >= 0) ? vol1 - vol0 : -1LL,
		(inv0 >= 0 && inv1 >= 0) ? inv1 - inv0 : -1LL, (long long)tail_switches);
	for (size_t i = 0; i < n; i++)
		fprintf(f, "%lld %lld %lld %lld\n", (long long)buf[W * i],
			(long long)buf[W * i + 1], (long long)buf[W * i + 2],
			(long long)buf[W * i + 3]);
	if (fclose(f)) {
		printf("ERR write %d %s\n", errno, strerror(errno));
		return 2;
	}
	printf("DONE %zu\n", n);
	return 0; /* exit while SCHED_DEADLINE: the bandwidth goes back */
}
