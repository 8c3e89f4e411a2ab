/* SPDX-License-Identifier: GPL-2.0 WITH Linux-syscall-note */
/*
 * kairos_ud.h - uAPI of the kvm-ud trap backend (kairos-libvirt, kmod/).
 *
 * A per-VM table of guest-kernel trap sites.  Each site is a 5-byte fentry NOP
 * (0f 1f 44 00 00); arming turns it into UD2 + the NOP's tail (0f 0b 44 00 00)
 * by writing one byte of guest memory from the kernel.  When a vCPU takes #UD
 * at an armed site, KVM records a fixed-size event (registers, CR3, time and a
 * bounded copy of guest memory chosen by the site's fetch list) into a per-VM
 * ring, signals an eventfd, sets RIP = site + 5 and resumes the guest without
 * an exit to userspace.  Every other #UD is handled exactly as before.
 *
 * The ioctls are VM ioctls (on the fd KVM_CREATE_VM returned).  Unlike KVM's
 * own VM ioctls they are accepted from another process (the agent gets QEMU's
 * VM fd with pidfd_getfd(2)); everything that touches guest memory runs on a
 * vCPU thread of the VM (the request is handed to a vCPU and waited for).
 *
 * Ioctl numbers: KVMIO (0xAE) 0xe8..0xea.  Linux (up to 6.18) uses KVMIO
 * numbers up to 0xd5 and 0xe0..0xe3 (KVM_CREATE_DEVICE, *_DEVICE_ATTR); 0xe8+
 * is free, and the size/direction bits keep them apart from any other use.
 * Probe: /sys/module/kvm/parameters/kairos_ud holds KAIROS_UD_API_VERSION.
 *
 * All structures have explicit padding and the same layout on every ABI
 * (x86_64 only in practice).  kairos_libvirt/introspect/kvmud.py mirrors them.
 */
#ifndef _UAPI_KAIROS_UD_H
#define _UAPI_KAIROS_UD_H

#include <linux/types.h>
#include <linux/ioctl.h>

#ifndef KVMIO
#define KVMIO 0xAE
#endif

#define KAIROS_UD_API_VERSION	2	/* 2: 512-byte events, 384 bytes of data (a whole pt_regs + the user struct) */

#define KAIROS_UD_MAX_TRAPS	64	/* sites per VM */
#define KAIROS_UD_MAX_FETCH	4	/* fetch steps per site */
#define KAIROS_UD_DATA_MAX	384	/* bytes of guest memory per event */
#define KAIROS_UD_PEEK_MAX	64	/* bytes per KAIROS_UD_OP_PEEK */

/* The site: a 5-byte NOP whose second byte becomes 0x0b (UD2) when armed. */
#define KAIROS_UD_SITE_LEN	5
#define KAIROS_UD_NOP5		{ 0x0f, 0x1f, 0x44, 0x00, 0x00 }
#define KAIROS_UD_ARMED5	{ 0x0f, 0x0b, 0x44, 0x00, 0x00 }

/*
 * Fetch step: copy `len` bytes from guest-virtual address base + offset into
 * the event's data[], after the previous steps' bytes.  base is a register
 * (KVM's numbering: 0 rax, 1 rcx, 2 rdx, 3 rbx, 4 rsp, 5 rbp, 6 rsi, 7 rdi,
 * 8..15 r8..r15) or KAIROS_UD_BASE_PREV: the little-endian u64 in the first 8
 * bytes the previous step copied (so "8 bytes at [rdi+0x68], then 48 bytes at
 * that address" is {7, 0x68, 8}, {PREV, 0, 48}).  Addresses in the lower half
 * are read as user accesses (SMAP does not hide them), upper-half ones as
 * supervisor accesses.  A step that faults stops the fetch (fetch_status).
 */
#define KAIROS_UD_BASE_PREV	16
struct kairos_ud_fetch {
	__u8 base;
	__u8 flags;		/* 0 */
	__u16 len;		/* 1..KAIROS_UD_DATA_MAX; the sum over steps <= KAIROS_UD_DATA_MAX */
	__s32 offset;
};

struct kairos_ud_trap {
	__u64 gva;		/* guest-virtual address of the 5-byte NOP */
	__u32 id;		/* caller's cookie, copied into each event */
	__u32 nfetch;		/* 0..KAIROS_UD_MAX_FETCH */
	struct kairos_ud_fetch fetch[KAIROS_UD_MAX_FETCH];
};				/* 48 bytes */

/*
 * KAIROS_UD_SETUP: create the VM's ring (first call) and return a new fd for
 * it (every call: an agent that restarts calls it again).  eventfd: an
 * eventfd(2) fd signalled once per recorded event (-1: none; a later call
 * replaces it).  nr_events: ring slots, a power of two in 16..65536 (0: 1024;
 * ignored once the ring exists).  Out: ring_fd (O_CLOEXEC), ring_size (bytes
 * to mmap(2) at offset 0, MAP_SHARED, PROT_READ|PROT_WRITE), api_version.
 */
struct kairos_ud_setup {
	__s32 eventfd;
	__u32 nr_events;
	__u32 flags;		/* 0 */
	__s32 ring_fd;		/* out */
	__u64 ring_size;	/* out */
	__u32 api_version;	/* out */
	__u32 pad;
};				/* 32 bytes */

/*
 * KAIROS_UD_SET_TRAPS: replace the trap table (nr entries at user pointer
 * traps).  A site that is armed must keep its index and address (else EBUSY);
 * its fetch list may change.  Rate limit (token bucket per VM): rate events
 * per second (0: 10000), bursts of up to burst (0: 1000).  A trap hit over the
 * limit still skips the site but records nothing ("rate_dropped").
 */
struct kairos_ud_traps {
	__u32 nr;
	__u32 flags;		/* 0 */
	__u32 rate;
	__u32 burst;
	__u64 traps;		/* struct kairos_ud_trap __user * */
};				/* 24 bytes */

/*
 * KAIROS_UD_CTL: an operation run on a vCPU thread of the VM (vcpu: index,
 * usually 0), waited for up to timeout_ms (0: 2000, at most 10000; ETIMEDOUT if the vCPU
 * thread did not come by, e.g. the VM is paused: nothing was done then).
 *   ARM    trap `index`: the 5 bytes at its gva must be KAIROS_UD_NOP5
 *          (EBADMSG otherwise, nothing written; already armed: 0).
 *   DISARM trap `index`: restore KAIROS_UD_NOP5 (the bytes must be
 *          KAIROS_UD_ARMED5 or already NOP5, EBADMSG otherwise).
 *   PEEK   read len (<= KAIROS_UD_PEEK_MAX) bytes at gva.
 * Out: bytes (ARM/DISARM: the site's 5 bytes after the operation), gpa of the
 * first byte, result (0 or a negative errno, also the ioctl's error).
 */
#define KAIROS_UD_OP_ARM	1
#define KAIROS_UD_OP_DISARM	2
#define KAIROS_UD_OP_PEEK	3
struct kairos_ud_ctl {
	__u32 op;
	__u32 index;
	__u64 gva;		/* PEEK */
	__u32 len;		/* PEEK */
	__u32 vcpu;
	__u32 timeout_ms;
	__s32 result;		/* out */
	__u64 gpa;		/* out */
	__u8 bytes[KAIROS_UD_PEEK_MAX];	/* out */
};				/* 104 bytes */

#define KAIROS_UD_SETUP		_IOWR(KVMIO, 0xe8, struct kairos_ud_setup)
#define KAIROS_UD_SET_TRAPS	_IOW(KVMIO, 0xe9, struct kairos_ud_traps)
#define KAIROS_UD_CTL		_IOWR(KVMIO, 0xea, struct kairos_ud_ctl)

/*
 * The ring: mmap of ring_size bytes.  Page 0 is this header; event slot i is
 * at data_offset + (i % nr_events) * event_size.  The kernel writes an event,
 * then head (release order); the reader reads events [tail, head) and then
 * stores tail.  A full ring drops the new event (overflow); the guest never
 * waits.  Counters are written by the kernel only (informational).
 */
#define KAIROS_UD_RING_MAGIC	0x3144554bu	/* "KUD1" little-endian */
struct kairos_ud_ring {
	__u32 magic;
	__u16 version;		/* KAIROS_UD_API_VERSION */
	__u16 event_size;	/* sizeof(struct kairos_ud_event) */
	__u32 nr_events;
	__u32 data_offset;
	__u64 hits;		/* every #UD at an armed site */
	__u64 recorded;		/* events written to the ring */
	__u64 rate_dropped;	/* over the rate limit: site skipped, no event */
	__u64 overflow;		/* ring full: site skipped, no event */
	__u64 fetch_faults;	/* events whose fetch list faulted */
	__u64 stale;		/* #UD at a site just disarmed: resumed, no event */
	__u64 armed_mask;	/* bit i: trap i is armed */
	__u64 head;		/* offset 72: next sequence number the kernel writes */
	__u64 pad0[6];
	__u64 tail;		/* offset 128: next sequence number userspace reads (userspace writes) */
	__u64 pad1[15];
	__u64 trap_hits[KAIROS_UD_MAX_TRAPS];	/* offset 256 */
};

/* Event flags */
#define KAIROS_UD_EV_FETCH_FAULT	0x1	/* fetch_status = 1 + the step that faulted */

struct kairos_ud_event {
	__u64 seq;		/*   0 */
	__u64 host_ns;		/*   8: ktime_get_ns() of the host running the VM */
	__u64 guest_tsc;	/*  16: the guest's TSC at the trap */
	__u64 rip;		/*  24: the site */
	__u64 cr3;		/*  32 */
	__u64 rflags;		/*  40 */
	__u64 rdi, rsi, rdx, r10, r8, r9, rax, rsp;	/* 48..111 */
	__u32 vcpu_id;		/* 112: vcpu_idx */
	__u32 trap_id;		/* 116: the trap's cookie */
	__u16 trap_index;	/* 120 */
	__u8 cpl;		/* 122 */
	__u8 fetch_status;	/* 123: 0 = every step copied */
	__u16 data_len;		/* 124: bytes valid in data[] */
	__u16 flags;		/* 126 */
	__u8 data[KAIROS_UD_DATA_MAX];	/* 128 */
};				/* 512 bytes */

#ifdef __KERNEL__
struct kvm;
struct kvm_vcpu;
/* Hooks, called from svm.c / vmx.c, x86.c and kvm_main.c (kmod/kairos-ud-6.1.patch). */
int kairos_ud_handle_ud(struct kvm_vcpu *vcpu);		/* instead of handle_ud() */
void kairos_ud_vcpu_run(struct kvm_vcpu *vcpu);		/* each vcpu_run() loop iteration */
void kairos_ud_destroy_vm(struct kvm *kvm);		/* start of kvm_arch_destroy_vm() */
long kairos_ud_vm_ioctl(struct kvm *kvm, unsigned int ioctl, unsigned long arg);
static inline bool kairos_ud_is_ioctl(unsigned int ioctl)
{
	return ioctl == KAIROS_UD_SETUP || ioctl == KAIROS_UD_SET_TRAPS || ioctl == KAIROS_UD_CTL;
}
#endif

#endif /* _UAPI_KAIROS_UD_H */
