/*
 * rtprog - the kairos test guest's real-time workload (static, runs as /bin/rtprog in the initramfs).
 *
 *   rtprog --policy deadline --runtime 2ms --deadline 10ms --period 10ms [--work 500us] [--count N]
 *   rtprog --policy fifo|rr --prio 50 --period 5ms [--work T] [--count N] [--cpu K]
 *   rtprog --policy other --period 10ms ...
 *   rtprog --hammer N [--policy ...]      N x sched_setattr(the requested policy), prints ns per call
 *   rtprog --getpid-loop N [--policy ...] N x getpid, prints ns per call
 *   rtprog --cpuid-loop N                 N x cpuid (an exit the hypervisor's kernel handles), ns per call
 *
 * Times take a unit suffix ns|us|ms|s; a bare number is microseconds.  Every output line starts with
 * "rtprog <pid> " so a test can follow one instance on a shared serial console:
 *   rtprog <pid> start policy=... prio=... runtime_ns=... deadline_ns=... period_ns=... flags=... work_ns=... count=...
 *     (policy, prio, runtime, deadline and flags as sched_getattr reads them back; period is the loop's)
 *   rtprog <pid> iter <N> cpu=<K> lat_avg_us=<..> lat_max_us=<..> missed=<M>     (about once a second)
 *   rtprog <pid> exit iters=<N> missed=<M> lat_avg_us=<..> lat_max_us=<..>
 *   rtprog <pid> hammer sched_setattr calls=<N> total_ns=<T> ns_per_call=<X>
 *   rtprog <pid> getpid-loop calls=<N> total_ns=<T> ns_per_call=<X>
 *   rtprog <pid> error: <what>: <strerror(errno)>                      (stderr; exit status 1)
 * Usage errors exit with status 2.  SIGTERM/SIGINT end the periodic loop and print the exit line.
 *
 * sched_setattr is called through the raw syscall (glibc 2.36 has no wrapper); struct sched_attr is the
 * uapi layout of include/uapi/linux/sched/types.h up to sched_period (SCHED_ATTR_SIZE_VER0 = 48 bytes).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#ifndef SCHED_DEADLINE
#define SCHED_DEADLINE 6
#endif

#if defined(__NR_sched_setattr) && defined(__NR_sched_getattr)
#define NR_SCHED_SETATTR __NR_sched_setattr
#define NR_SCHED_GETATTR __NR_sched_getattr
#elif defined(__x86_64__)
#define NR_SCHED_SETATTR 314
#define NR_SCHED_GETATTR 315
#else
#error "unknown architecture: add its sched_setattr/sched_getattr syscall numbers"
#endif

/* struct sched_attr, include/uapi/linux/sched/types.h */
struct rt_sched_attr {
	uint32_t size;
	uint32_t sched_policy;
	uint64_t sched_flags;
	int32_t sched_nice;
	uint32_t sched_priority;
	uint64_t sched_runtime;   /* ns, SCHED_DEADLINE */
	uint64_t sched_deadline;
	uint64_t sched_period;
	/* SCHED_ATTR_SIZE_VER1 adds sched_util_min/max (uclamp); not needed here */
};
_Static_assert(sizeof(struct rt_sched_attr) == 48, "struct sched_attr must be 48 bytes (SCHED_ATTR_SIZE_VER0)");

static pid_t me;
static volatile sig_atomic_t stop;

static void on_signal(int sig)
{
	(void)sig;
	stop = 1;
}

static void die(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));
static void die(const char *fmt, ...)
{
	int e = errno;
	char buf[256];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(buf, sizeof(buf), fmt, ap);
	va_end(ap);
	fflush(stdout);
	fprintf(stderr, "rtprog %d error: %s: %s\n", (int)me, buf, strerror(e));
	exit(1);
}

static void usage_error(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));
static void usage_error(const char *fmt, ...)
{
	va_list ap;

	fflush(stdout);
	fprintf(stderr, "rtprog %d usage error: ", (int)me);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fprintf(stderr, "\n(try rtprog --help)\n");
	exit(2);
}

static const char usage_text[] =
	"usage: rtprog [--policy deadline|fifo|rr|other] [--prio P] [--runtime T] [--deadline T] [--period T]\n"
	"              [--flags F] [--work T] [--count N] [--report T] [--cpu K]\n"
	"       rtprog --hammer N [policy options]      time N sched_setattr calls\n"
	"       rtprog --getpid-loop N [policy options] time N getpid calls\n"
	"       rtprog --cpuid-loop N                   time N cpuid instructions (a VM exit each)\n"
	"       rtprog --garbage N                      scheduling syscalls with garbage arguments\n"
	"       rtprog --spawn N                        N short-lived SCHED_FIFO child processes\n"
	"Times: NUMBER[ns|us|ms|s], a bare number is us.  --count 0 runs until SIGTERM/SIGINT.\n"
	"Defaults: --policy other, --prio 50 (fifo/rr), --period 10ms (deadline: the deadline), --deadline = period,\n"
	"          --work 100us (CPU time burnt per period), --count 0, --report 1s.\n";

static uint64_t now_ns(clockid_t clk)
{
	struct timespec ts;

	if (clock_gettime(clk, &ts))
		die("clock_gettime(%d)", (int)clk);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* "2ms", "500us", "1.5s", "250000ns", "300" (= 300 us) -> ns */
static uint64_t parse_time(const char *opt, const char *s)
{
	char *end;
	double v, mult = 1e3;

	errno = 0;
	v = strtod(s, &end);
	if (end == s || errno || v < 0)
		usage_error("%s: bad time '%s'", opt, s);
	if (!strcmp(end, "ns"))
		mult = 1;
	else if (!strcmp(end, "us") || !*end)
		mult = 1e3;
	else if (!strcmp(end, "ms"))
		mult = 1e6;
	else if (!strcmp(end, "s"))
		mult = 1e9;
	else
		usage_error("%s: bad unit in '%s' (ns, us, ms or s)", opt, s);
	v = v * mult + 0.5;
	if (v >= 1.8e19)
		usage_error("%s: '%s' is too large", opt, s);
	return (uint64_t)v;
}

static uint64_t parse_uint(const char *opt, const char *s)
{
	char *end;
	unsigned long long v;

	errno = 0;
	v = strtoull(s, &end, 0);
	if (end == s || *end || errno || s[0] == '-')
		usage_error("%s: bad number '%s'", opt, s);
	return v;
}

static const char *policy_name(int p)
{
	switch (p) {
	case SCHED_OTHER: return "other";
	case SCHED_FIFO: return "fifo";
	case SCHED_RR: return "rr";
	case SCHED_DEADLINE: return "deadline";
	}
	return "?";
}

struct cfg {
	int policy;
	unsigned prio;
	int prio_set;
	uint64_t runtime, deadline, period, flags;
	uint64_t work, count, report;
	long cpu;
	uint64_t hammer, getpid_loop, cpuid_loop, garbage, spawn;
};

static void fill_attr(const struct cfg *c, struct rt_sched_attr *a)
{
	memset(a, 0, sizeof(*a));
	a->size = sizeof(*a);
	a->sched_policy = (uint32_t)c->policy;
	a->sched_flags = c->flags;
	if (c->policy == SCHED_FIFO || c->policy == SCHED_RR)
		a->sched_priority = c->prio;
	if (c->policy == SCHED_DEADLINE) {
		a->sched_runtime = c->runtime;
		a->sched_deadline = c->deadline;
		a->sched_period = c->period;
	}
}

static void apply_policy(const struct cfg *c)
{
	if (c->policy == SCHED_DEADLINE || c->flags) {
		struct rt_sched_attr a;

		fill_attr(c, &a);
		if (syscall(NR_SCHED_SETATTR, 0, &a, 0))
			die("sched_setattr(policy=%s runtime=%" PRIu64 " deadline=%" PRIu64 " period=%" PRIu64
			    " flags=0x%" PRIx64 ")", policy_name(c->policy), c->runtime, c->deadline, c->period, c->flags);
	} else {
		struct sched_param sp = { .sched_priority = (c->policy == SCHED_FIFO || c->policy == SCHED_RR) ? (int)c->prio : 0 };

		if (sched_setscheduler(0, c->policy, &sp))
			die("sched_setscheduler(policy=%s prio=%d)", policy_name(c->policy), sp.sched_priority);
	}
}

/* Calibrated busy loop: --work is CPU time as the guest accounts it, turned into loop iterations once at start
 * so the periodic loop makes no extra syscalls (a trap-based tracer sees only clock_nanosleep per period). */
static volatile uint64_t sink;

static void spin(uint64_t loops)
{
	uint64_t x = sink;

	for (uint64_t i = 0; i < loops; i++)
		x = x * 6364136223846793005ull + 1442695040888963407ull;
	sink = x;
}

static double calibrate_loops_per_ns(void)
{
	uint64_t loops = 1000, t0, dt = 0;

	spin(loops); /* warm up (TCG translates the loop on first use) */
	for (;;) {
		t0 = now_ns(CLOCK_THREAD_CPUTIME_ID);
		spin(loops);
		dt = now_ns(CLOCK_THREAD_CPUTIME_ID) - t0;
		if (dt >= 20000000ull || loops >= (1ull << 40))
			break;
		loops *= 2;
	}
	return dt ? (double)loops / (double)dt : 1.0;
}

static void timespec_from_ns(struct timespec *ts, uint64_t ns)
{
	ts->tv_sec = (time_t)(ns / 1000000000ull);
	ts->tv_nsec = (long)(ns % 1000000000ull);
}

static int run_hammer(const struct cfg *c)
{
	struct rt_sched_attr a;
	uint64_t t0, dt;

	fill_attr(c, &a);
	t0 = now_ns(CLOCK_MONOTONIC);
	for (uint64_t i = 0; i < c->hammer; i++)
		if (syscall(NR_SCHED_SETATTR, 0, &a, 0))
			die("sched_setattr call %" PRIu64 " (policy=%s)", i + 1, policy_name(c->policy));
	dt = now_ns(CLOCK_MONOTONIC) - t0;
	printf("rtprog %d hammer sched_setattr policy=%s calls=%" PRIu64 " total_ns=%" PRIu64 " ns_per_call=%.1f\n",
	       (int)me, policy_name(c->policy), c->hammer, dt, c->hammer ? (double)dt / (double)c->hammer : 0.0);
	return 0;
}

/* Hostile-guest test: scheduling syscalls with garbage arguments; every error is expected. */
static int run_garbage(const struct cfg *c)
{
	static const uintptr_t ptrs[] = { 0, 1, 0x1000, 0xdeadbeef, 0x7ffffffff000ull,
					  0xffffffff81000000ull, 0xffff888000000000ull, (uintptr_t)-1 };
	unsigned char junk[64];
	uint64_t fails = 0;

	for (uint64_t i = 0; i < c->garbage; i++) {
		uintptr_t p = ptrs[i % (sizeof(ptrs) / sizeof(ptrs[0]))];
		memset(junk, (int)(i * 37), sizeof(junk));
		((uint32_t *)junk)[0] = (uint32_t)(i * 2654435761u); /* absurd sizes */
		fails += syscall(NR_SCHED_SETATTR, 0, (void *)p, 0) != 0;
		fails += syscall(NR_SCHED_SETATTR, 0, junk, (unsigned)i) != 0;
		fails += syscall(SYS_sched_setscheduler, 0, (int)i, (void *)p) != 0;
		fails += syscall(SYS_sched_setparam, (int)-i, (void *)p) != 0;
		fails += syscall(SYS_clock_nanosleep, (int)(i % 16), 1, (void *)p, NULL) != 0;
	}
	printf("rtprog %d garbage calls=%" PRIu64 " failed=%" PRIu64 "\n", (int)me, 5 * c->garbage, fails);
	return 0;
}

/* Hostile-guest test: many short-lived SCHED_FIFO tasks. */
static int run_spawn(const struct cfg *c)
{
	uint64_t ok = 0;

	for (uint64_t i = 0; i < c->spawn; i++) {
		pid_t p = fork();
		if (p == 0) {
			struct sched_param sp = { .sched_priority = 10 };
			_exit(sched_setscheduler(0, SCHED_FIFO, &sp) ? 1 : 0);
		}
		if (p > 0) {
			int st;
			if (waitpid(p, &st, 0) == p && WIFEXITED(st) && WEXITSTATUS(st) == 0)
				ok++;
		}
	}
	printf("rtprog %d spawn tasks=%" PRIu64 " fifo_ok=%" PRIu64 "\n", (int)me, c->spawn, ok);
	return 0;
}

static int run_getpid_loop(const struct cfg *c)
{
	uint64_t t0, dt;

	t0 = now_ns(CLOCK_MONOTONIC);
	for (uint64_t i = 0; i < c->getpid_loop; i++)
		syscall(SYS_getpid); /* raw syscall: never a cached value */
	dt = now_ns(CLOCK_MONOTONIC) - t0;
	printf("rtprog %d getpid-loop calls=%" PRIu64 " total_ns=%" PRIu64 " ns_per_call=%.1f\n", (int)me,
	       c->getpid_loop, dt, c->getpid_loop ? (double)dt / (double)c->getpid_loop : 0.0);
	return 0;
}

/* N x CPUID: an exit the hypervisor always handles in its kernel (KVM never passes it to user
 * space), the floor a trapped call is compared with (bench/kvmud: kvm-ud/exit). */
static int run_cpuid_loop(const struct cfg *c)
{
	uint64_t t0, dt;
	uint32_t a, b, cx, d;

	t0 = now_ns(CLOCK_MONOTONIC);
	for (uint64_t i = 0; i < c->cpuid_loop; i++) {
		a = 0;
		cx = 0;
		__asm__ volatile("cpuid" : "+a"(a), "=b"(b), "+c"(cx), "=d"(d) : : "memory");
	}
	dt = now_ns(CLOCK_MONOTONIC) - t0;
	printf("rtprog %d cpuid-loop calls=%" PRIu64 " total_ns=%" PRIu64 " ns_per_call=%.1f\n", (int)me,
	       c->cpuid_loop, dt, c->cpuid_loop ? (double)dt / (double)c->cpuid_loop : 0.0);
	return 0;
}

static int run_periodic(const struct cfg *c)
{
	uint64_t loops_per_work, next, t, lat, iter = 0, missed = 0;
	uint64_t lat_sum = 0, lat_max = 0, rep_iters = 0, rep_sum = 0, rep_max = 0, rep_missed = 0;
	uint64_t last_report;
	double lpn;
	struct rt_sched_attr got;
	struct timespec ts;
	int err;

	lpn = calibrate_loops_per_ns();
	loops_per_work = (uint64_t)(lpn * (double)c->work + 0.5);

	if (mlockall(MCL_CURRENT | MCL_FUTURE))
		fprintf(stderr, "rtprog %d warning: mlockall: %s (continuing)\n", (int)me, strerror(errno));
	/* The mark on the console right before the call: the host times its reaction from it
	 * (bench/introspection).  write(2): no stdio buffer between the mark and the call. */
	{
		char mark[64];
		int n = snprintf(mark, sizeof(mark), "rtprog %d policy call\n", (int)me);
		fflush(stdout);
		if (n > 0 && write(1, mark, (size_t)n) < 0) {
			/* the console is a nicety */
		}
	}
	apply_policy(c);

	memset(&got, 0, sizeof(got));
	if (syscall(NR_SCHED_GETATTR, 0, &got, sizeof(got), 0))
		die("sched_getattr");
	if (got.sched_policy != SCHED_DEADLINE) /* for CFS the kernel reports its slice as runtime: not ours */
		got.sched_runtime = got.sched_deadline = 0;
	else if (got.sched_period != c->period)
		die("sched_getattr says period %" PRIu64 " ns, asked for %" PRIu64, (uint64_t)got.sched_period, c->period);
	printf("rtprog %d start policy=%s prio=%u runtime_ns=%" PRIu64 " deadline_ns=%" PRIu64 " period_ns=%" PRIu64
	       " flags=0x%" PRIx64 " work_ns=%" PRIu64 " count=%" PRIu64 " loops_per_us=%.1f\n",
	       (int)me, policy_name((int)got.sched_policy), got.sched_priority, (uint64_t)got.sched_runtime,
	       (uint64_t)got.sched_deadline, c->period, (uint64_t)got.sched_flags, c->work,
	       c->count, lpn * 1000.0);

	next = now_ns(CLOCK_MONOTONIC);
	last_report = next;
	while (!stop && (c->count == 0 || iter < c->count)) {
		next += c->period;
		timespec_from_ns(&ts, next);
		do
			err = clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL);
		while (err == EINTR && !stop);
		if (err && err != EINTR) {
			errno = err;
			die("clock_nanosleep");
		}
		if (stop)
			break;
		t = now_ns(CLOCK_MONOTONIC);
		lat = t > next ? t - next : 0;
		iter++;
		lat_sum += lat;
		rep_sum += lat;
		rep_iters++;
		if (lat > lat_max)
			lat_max = lat;
		if (lat > rep_max)
			rep_max = lat;

		spin(loops_per_work);

		t = now_ns(CLOCK_MONOTONIC);
		/* overran into the next period(s): skip them instead of bursting to catch up */
		while (t >= next + c->period) {
			next += c->period;
			missed++;
			rep_missed++;
		}
		if (t - last_report >= c->report) {
			printf("rtprog %d iter %" PRIu64 " cpu=%d lat_avg_us=%.1f lat_max_us=%.1f missed=%" PRIu64 "\n",
			       (int)me, iter, sched_getcpu(), rep_iters ? (double)rep_sum / (double)rep_iters / 1e3 : 0.0,
			       (double)rep_max / 1e3, rep_missed);
			last_report = t;
			rep_iters = rep_sum = rep_max = rep_missed = 0;
		}
	}
	printf("rtprog %d exit iters=%" PRIu64 " missed=%" PRIu64 " lat_avg_us=%.1f lat_max_us=%.1f%s\n", (int)me, iter,
	       missed, iter ? (double)lat_sum / (double)iter / 1e3 : 0.0, (double)lat_max / 1e3,
	       stop ? " reason=signal" : "");
	return 0;
}

int main(int argc, char **argv)
{
	enum { O_POLICY = 256, O_PRIO, O_RUNTIME, O_DEADLINE, O_PERIOD, O_FLAGS, O_WORK, O_COUNT, O_REPORT, O_CPU,
	       O_HAMMER, O_GETPID, O_CPUID, O_GARBAGE, O_SPAWN };
	static const struct option opts[] = {
		{ "policy", required_argument, 0, O_POLICY },
		{ "prio", required_argument, 0, O_PRIO },
		{ "runtime", required_argument, 0, O_RUNTIME },
		{ "deadline", required_argument, 0, O_DEADLINE },
		{ "period", required_argument, 0, O_PERIOD },
		{ "flags", required_argument, 0, O_FLAGS },
		{ "work", required_argument, 0, O_WORK },
		{ "count", required_argument, 0, O_COUNT },
		{ "report", required_argument, 0, O_REPORT },
		{ "cpu", required_argument, 0, O_CPU },
		{ "hammer", required_argument, 0, O_HAMMER },
		{ "getpid-loop", required_argument, 0, O_GETPID },
		{ "cpuid-loop", required_argument, 0, O_CPUID },
		{ "garbage", required_argument, 0, O_GARBAGE },
		{ "spawn", required_argument, 0, O_SPAWN },
		{ "help", no_argument, 0, 'h' },
		{ 0, 0, 0, 0 },
	};
	struct cfg c = { .policy = SCHED_OTHER, .prio = 50, .work = 100000, .report = 1000000000ull, .cpu = -1 };
	int o;

	me = getpid();
	setvbuf(stdout, NULL, _IOLBF, 0);
	while ((o = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
		switch (o) {
		case O_POLICY:
			if (!strcmp(optarg, "deadline"))
				c.policy = SCHED_DEADLINE;
			else if (!strcmp(optarg, "fifo"))
				c.policy = SCHED_FIFO;
			else if (!strcmp(optarg, "rr"))
				c.policy = SCHED_RR;
			else if (!strcmp(optarg, "other"))
				c.policy = SCHED_OTHER;
			else
				usage_error("--policy: '%s' is not deadline, fifo, rr or other", optarg);
			break;
		case O_PRIO:
			c.prio = (unsigned)parse_uint("--prio", optarg);
			c.prio_set = 1;
			break;
		case O_RUNTIME: c.runtime = parse_time("--runtime", optarg); break;
		case O_DEADLINE: c.deadline = parse_time("--deadline", optarg); break;
		case O_PERIOD: c.period = parse_time("--period", optarg); break;
		case O_FLAGS: c.flags = parse_uint("--flags", optarg); break;
		case O_WORK: c.work = parse_time("--work", optarg); break;
		case O_COUNT: c.count = parse_uint("--count", optarg); break;
		case O_REPORT: c.report = parse_time("--report", optarg); break;
		case O_CPU: c.cpu = (long)parse_uint("--cpu", optarg); break;
		case O_HAMMER: c.hammer = parse_uint("--hammer", optarg); break;
		case O_GETPID: c.getpid_loop = parse_uint("--getpid-loop", optarg); break;
		case O_CPUID: c.cpuid_loop = parse_uint("--cpuid-loop", optarg); break;
		case O_GARBAGE: c.garbage = parse_uint("--garbage", optarg); break;
		case O_SPAWN: c.spawn = parse_uint("--spawn", optarg); break;
		case 'h':
			fputs(usage_text, stdout);
			return 0;
		default:
			usage_error("unknown option");
		}
	}
	if (optind < argc)
		usage_error("unexpected argument '%s'", argv[optind]);
	if (c.hammer && c.getpid_loop)
		usage_error("--hammer and --getpid-loop are separate runs");
	if (c.prio_set && c.policy != SCHED_FIFO && c.policy != SCHED_RR)
		usage_error("--prio is for --policy fifo or rr");
	if (c.policy == SCHED_DEADLINE) {
		/* The kernel checks runtime <= deadline <= period and runtime >= 1024 ns; we only fill defaults so
		 * that an EINVAL/EBUSY is the kernel's own answer. */
		if (!c.runtime)
			usage_error("--policy deadline needs --runtime");
		if (!c.period)
			c.period = c.deadline;
		if (!c.deadline)
			c.deadline = c.period;
		if (!c.period)
			usage_error("--policy deadline needs --period or --deadline");
	} else {
		if (c.runtime || c.deadline)
			usage_error("--runtime/--deadline are for --policy deadline");
		if (!c.period)
			c.period = 10000000ull;
	}
	if (!c.period)
		usage_error("--period must be > 0");

	if (c.cpu >= 0) {
		cpu_set_t set;

		CPU_ZERO(&set);
		CPU_SET((int)c.cpu, &set);
		if (sched_setaffinity(0, sizeof(set), &set))
			die("sched_setaffinity(cpu %ld)", c.cpu);
	}

	struct sigaction sa;
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_signal; /* no SA_RESTART: clock_nanosleep returns EINTR */
	sigaction(SIGTERM, &sa, NULL);
	sigaction(SIGINT, &sa, NULL);

	if (c.garbage)
		return run_garbage(&c);
	if (c.spawn)
		return run_spawn(&c);
	if (c.cpuid_loop)
		return run_cpuid_loop(&c);
	if (c.hammer)
		return run_hammer(&c);
	if (c.getpid_loop) {
		if (c.policy != SCHED_OTHER || c.flags)
			apply_policy(&c);
		return run_getpid_loop(&c);
	}
	return run_periodic(&c);
}
