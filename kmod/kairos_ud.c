// SPDX-License-Identifier: GPL-2.0
/*
 * kairos_ud.c - the kvm-ud trap backend of kairos-libvirt (KairosVM, ETFA 2014).
 *
 * Guest-kernel trap sites are 5-byte fentry NOPs (0f 1f 44 00 00).  Arming one
 * writes a single byte of guest memory (0x1f -> 0x0b: UD2 followed by the NOP's
 * tail).  A #UD intercepted at an armed site is handled here, in the kernel:
 * record a fixed-size event into the VM's ring (registers, CR3, times, and a
 * bounded copy of guest memory chosen by the site's fetch list), signal the
 * eventfd, set RIP = site + 5 and resume the guest.  No exit to userspace, no
 * instruction decoding (next_rip / decode assists are never needed), bounded
 * work per trap, and a per-VM token bucket so a guest that hammers a site
 * cannot make the host record without limit.  Any other #UD goes to KVM's
 * handle_ud() exactly as before.
 *
 * Interface: kairos_ud.h (VM ioctls, ring layout).  Hooks (kairos-ud-6.1.patch):
 *   svm.c ud_interception(), vmx.c handle_exception_nmi(): kairos_ud_handle_ud()
 *   x86.c vcpu_run() loop: kairos_ud_vcpu_run() runs arm/disarm/peek requests
 *         on a vCPU thread (guest page walks need a loaded vCPU, and guest
 *         memory is reached through QEMU's address space);
 *   x86.c kvm_arch_destroy_vm(): kairos_ud_destroy_vm();
 *   kvm_main.c kvm_vm_ioctl(): our ioctls, before KVM's same-mm check (the
 *         agent is another process holding a pidfd_getfd() copy of the fd).
 * Teardown: an mmu notifier on QEMU's mm restores armed sites when the address
 * space goes away (at QEMU's exit its mappings are still intact in ->release,
 * which matters for shared/file-backed guest memory), or when the VM is
 * destroyed while QEMU lives.
 */
#define pr_fmt(fmt) "kvm: kairos_ud: " fmt

#include <linux/kvm_host.h>
#include <linux/anon_inodes.h>
#include <linux/eventfd.h>
#include <linux/file.h>
#include <linux/hashtable.h>
#include <linux/highmem.h>
#include <linux/mm.h>
#include <linux/mmu_notifier.h>
#include <linux/sched/mm.h>
#include <linux/uaccess.h>
#include <linux/vmalloc.h>
#include <asm/unaligned.h>

#include "kvm_cache_regs.h"
#include "x86.h"
#include "kairos_ud.h"

static int kairos_ud = KAIROS_UD_API_VERSION;
module_param(kairos_ud, int, 0444);
MODULE_PARM_DESC(kairos_ud, "kvm-ud trap backend present: its API version (read-only)");

#define KAIROS_DEFAULT_RATE	10000
#define KAIROS_DEFAULT_BURST	1000
#define KAIROS_DEFAULT_TMO_MS	2000
#define KAIROS_MAX_TMO_MS	10000	/* vm->lock is held meanwhile (the exit-time restore waits for it) */

static const u8 kairos_nop5[KAIROS_UD_SITE_LEN] = KAIROS_UD_NOP5;
static const u8 kairos_ud5[KAIROS_UD_SITE_LEN] = KAIROS_UD_ARMED5;

struct kairos_ring {
	struct kref ref;		/* the VM + each ring fd */
	struct kairos_ud_ring *hdr;	/* vmalloc_user(): header page + slots */
	size_t size;
	u32 nr;
};

struct kairos_table {
	struct rcu_head rcu;
	u32 nr;
	struct kairos_ud_trap t[];
};

struct kairos_op {			/* on the stack of the ioctl that waits for it */
	struct kairos_ud_ctl *ctl;
	int vcpu_idx;
	struct completion done;
};

struct kairos_vm {
	struct hlist_node node;		/* kairos_vms, RCU */
	struct kvm *kvm;
	struct mutex lock;		/* ioctls, arming state, restore */
	struct kairos_table __rcu *table;

	spinlock_t ring_lock;		/* ring producer, counters, bucket, evfd */
	struct kairos_ring *ring;
	struct eventfd_ctx *evfd;
	u64 head;			/* the kernel's own copy of hdr->head */
	u64 tb_last, tb_credit, tb_cost, tb_max;	/* token bucket, in ns of credit */

	spinlock_t op_lock;
	struct kairos_op *op;		/* pending, not yet taken by its vCPU */

	u64 armed;			/* bit i: trap i armed (we wrote 0x0b) */
	gpa_t patch_gpa[KAIROS_UD_MAX_TRAPS];	/* gpa of the byte we wrote */

	struct mmu_notifier mn;
	bool mn_registered;
};

static DEFINE_HASHTABLE(kairos_vms, 6);
static DEFINE_MUTEX(kairos_vms_mutex);
static atomic_t kairos_nr_vms = ATOMIC_INIT(0);
static atomic_t kairos_ops_pending = ATOMIC_INIT(0);

/* Caller holds rcu_read_lock() (or kairos_vms_mutex). */
static struct kairos_vm *kairos_find(struct kvm *kvm)
{
	struct kairos_vm *vm;

	hash_for_each_possible_rcu(kairos_vms, vm, node, (unsigned long)kvm)
		if (vm->kvm == kvm)
			return vm;
	return NULL;
}

/* ---------------- the ring ---------------- */

static void kairos_ring_free(struct kref *ref)
{
	struct kairos_ring *ring = container_of(ref, struct kairos_ring, ref);

	vfree(ring->hdr);
	kfree(ring);
}

static struct kairos_ring *kairos_ring_alloc(u32 nr)
{
	struct kairos_ring *ring = kzalloc(sizeof(*ring), GFP_KERNEL_ACCOUNT);

	if (!ring)
		return NULL;
	ring->nr = nr;
	ring->size = PAGE_ALIGN(PAGE_SIZE + (size_t)nr * sizeof(struct kairos_ud_event));
	ring->hdr = vmalloc_user(ring->size);	/* zeroed */
	if (!ring->hdr) {
		kfree(ring);
		return NULL;
	}
	kref_init(&ring->ref);
	ring->hdr->magic = KAIROS_UD_RING_MAGIC;
	ring->hdr->version = KAIROS_UD_API_VERSION;
	ring->hdr->event_size = sizeof(struct kairos_ud_event);
	ring->hdr->nr_events = nr;
	ring->hdr->data_offset = PAGE_SIZE;
	return ring;
}

static int kairos_ring_mmap(struct file *file, struct vm_area_struct *vma)
{
	struct kairos_ring *ring = file->private_data;

	if (vma->vm_pgoff || vma->vm_end - vma->vm_start > ring->size)
		return -EINVAL;
	return remap_vmalloc_range(vma, ring->hdr, 0);
}

static int kairos_ring_release(struct inode *inode, struct file *file)
{
	struct kairos_ring *ring = file->private_data;

	kref_put(&ring->ref, kairos_ring_free);
	return 0;
}

static const struct file_operations kairos_ring_fops = {
	.owner = THIS_MODULE,
	.mmap = kairos_ring_mmap,
	.release = kairos_ring_release,
	.llseek = noop_llseek,
};

/* ---------------- guest memory, on a vCPU thread ---------------- */

/* Lower-half addresses are read as user accesses: SMAP would hide user pages from a supervisor read. */
static gpa_t kairos_gva_to_gpa(struct kvm_vcpu *vcpu, u64 gva)
{
	struct kvm_mmu *mmu = vcpu->arch.walk_mmu;
	struct x86_exception e;
	u64 access = (s64)gva >= 0 ? PFERR_USER_MASK : 0;

	return mmu->gva_to_gpa(vcpu, mmu, gva, access, &e);
}

static int kairos_read_gva(struct kvm_vcpu *vcpu, u64 gva, void *buf, unsigned int len)
{
	while (len) {
		unsigned int n = min_t(unsigned int, len, PAGE_SIZE - offset_in_page(gva));
		gpa_t gpa = kairos_gva_to_gpa(vcpu, gva);

		if (gpa == INVALID_GPA || kvm_vcpu_read_guest(vcpu, gpa, buf, n))
			return -EFAULT;
		gva += n;
		buf += n;
		len -= n;
	}
	return 0;
}

/* ---------------- the trap ---------------- */

static bool kairos_bucket_take(struct kairos_vm *vm, u64 now)
{
	u64 elapsed = now - vm->tb_last;

	vm->tb_last = now;
	vm->tb_credit = min(vm->tb_credit + min(elapsed, vm->tb_max), vm->tb_max);
	if (vm->tb_credit < vm->tb_cost)
		return false;
	vm->tb_credit -= vm->tb_cost;
	return true;
}

static void kairos_fetch(struct kvm_vcpu *vcpu, const struct kairos_ud_trap *trap,
			 struct kairos_ud_event *ev)
{
	unsigned int used = 0, prev = 0, i;

	for (i = 0; i < trap->nfetch; i++) {
		const struct kairos_ud_fetch *f = &trap->fetch[i];
		u64 base;

		if (f->base == KAIROS_UD_BASE_PREV)
			base = get_unaligned_le64(ev->data + prev);	/* validated: previous len >= 8 */
		else
			base = kvm_register_read(vcpu, f->base);
		if (kairos_read_gva(vcpu, base + (s64)f->offset, ev->data + used, f->len)) {
			ev->fetch_status = i + 1;
			ev->flags |= KAIROS_UD_EV_FETCH_FAULT;
			break;
		}
		prev = used;
		used += f->len;
	}
	ev->data_len = used;
}

static void kairos_record(struct kairos_vm *vm, struct kvm_vcpu *vcpu, unsigned int idx,
			  const struct kairos_ud_trap *trap, u64 rip, unsigned long rflags)
{
	struct kairos_ring *ring = vm->ring;
	struct kairos_ud_ring *h = ring->hdr;
	struct kairos_ud_event ev;
	u64 now = ktime_get_ns();
	bool ok;

	spin_lock(&vm->ring_lock);
	h->hits++;
	h->trap_hits[idx]++;
	ok = kairos_bucket_take(vm, now);
	if (!ok)
		h->rate_dropped++;
	spin_unlock(&vm->ring_lock);
	if (!ok)
		return;

	memset(&ev, 0, sizeof(ev));
	ev.host_ns = now;
	ev.guest_tsc = kvm_read_l1_tsc(vcpu, rdtsc());
	ev.rip = rip;
	ev.cr3 = kvm_read_cr3(vcpu);
	ev.rflags = rflags;
	ev.rdi = kvm_register_read(vcpu, VCPU_REGS_RDI);
	ev.rsi = kvm_register_read(vcpu, VCPU_REGS_RSI);
	ev.rdx = kvm_register_read(vcpu, VCPU_REGS_RDX);
	ev.r10 = kvm_register_read(vcpu, VCPU_REGS_R10);
	ev.r8 = kvm_register_read(vcpu, VCPU_REGS_R8);
	ev.r9 = kvm_register_read(vcpu, VCPU_REGS_R9);
	ev.rax = kvm_register_read(vcpu, VCPU_REGS_RAX);
	ev.rsp = kvm_register_read(vcpu, VCPU_REGS_RSP);
	ev.vcpu_id = vcpu->vcpu_idx;
	ev.trap_id = trap->id;
	ev.trap_index = idx;
	ev.cpl = static_call(kvm_x86_get_cpl)(vcpu);
	kairos_fetch(vcpu, trap, &ev);	/* may sleep (guest memory): outside the lock */

	spin_lock(&vm->ring_lock);
	/* tail is written by userspace: a bogus one only makes the ring look full */
	if (vm->head - READ_ONCE(h->tail) >= ring->nr) {
		h->overflow++;
	} else {
		ev.seq = vm->head;
		/* the header page is writable by the reader: never take an offset or size from it */
		memcpy((u8 *)h + PAGE_SIZE + (vm->head & (ring->nr - 1)) * sizeof(ev), &ev, sizeof(ev));
		smp_wmb();	/* the slot before head */
		vm->head++;
		WRITE_ONCE(h->head, vm->head);
		h->recorded++;
		if (ev.flags & KAIROS_UD_EV_FETCH_FAULT)
			h->fetch_faults++;
		if (vm->evfd)
			eventfd_signal(vm->evfd, 1);
	}
	spin_unlock(&vm->ring_lock);
}

/* What kvm_skip_emulated_instruction() does after a skip when the guest single-steps. */
static int kairos_singlestep(struct kvm_vcpu *vcpu)
{
	if (vcpu->guest_debug & KVM_GUESTDBG_SINGLESTEP) {
		struct kvm_run *run = vcpu->run;

		run->debug.arch.dr6 = DR6_BS | DR6_ACTIVE_LOW;
		run->debug.arch.pc = kvm_get_linear_rip(vcpu);
		run->debug.arch.exception = DB_VECTOR;
		run->exit_reason = KVM_EXIT_DEBUG;
		return 0;
	}
	kvm_queue_exception_p(vcpu, DB_VECTOR, DR6_BS);
	return 1;
}

/* >= 0: handled (the exit handler's return value); < 0: not ours. */
static int kairos_trap(struct kvm_vcpu *vcpu)
{
	struct kairos_ud_trap trap;
	struct kairos_table *t;
	struct kairos_vm *vm;
	unsigned long rflags;
	u8 cur[KAIROS_UD_SITE_LEN];
	int idx = -1;
	unsigned int i;
	u64 rip;

	if (likely(!atomic_read(&kairos_nr_vms)))
		return -1;
	if (is_guest_mode(vcpu) || vcpu->arch.guest_state_protected)
		return -1;
	rip = kvm_get_linear_rip(vcpu);

	rcu_read_lock();
	vm = kairos_find(vcpu->kvm);	/* lives until kvm_arch_destroy_vm(): no vCPU runs then */
	t = vm ? rcu_dereference(vm->table) : NULL;
	for (i = 0; t && i < t->nr; i++) {
		if (t->t[i].gva == rip) {
			idx = i;
			trap = t->t[i];
			break;
		}
	}
	rcu_read_unlock();
	if (idx < 0)
		return -1;

	/* The bytes decide, not the table: a site just disarmed, a rebooted guest, someone else's UD2. */
	if (kairos_read_gva(vcpu, rip, cur, sizeof(cur)))
		return -1;
	if (!memcmp(cur, kairos_nop5, sizeof(cur))) {
		/* #UD taken before a disarm restored the NOP: execute the NOP now. */
		spin_lock(&vm->ring_lock);
		vm->ring->hdr->stale++;
		spin_unlock(&vm->ring_lock);
		return 1;
	}
	if (memcmp(cur, kairos_ud5, sizeof(cur)))
		return -1;

	rflags = static_call(kvm_x86_get_rflags)(vcpu);
	kairos_record(vm, vcpu, idx, &trap, rip, kvm_get_rflags(vcpu));
	/* Skip the whole 5-byte site ourselves: never next_rip or the emulator (nrips=0 in the testbed). */
	kvm_rip_write(vcpu, kvm_rip_read(vcpu) + KAIROS_UD_SITE_LEN);
	static_call(kvm_x86_set_interrupt_shadow)(vcpu, 0);
	if (unlikely(rflags & X86_EFLAGS_TF))
		return kairos_singlestep(vcpu);
	return 1;
}

int kairos_ud_handle_ud(struct kvm_vcpu *vcpu)
{
	int r = kairos_trap(vcpu);

	return r >= 0 ? r : handle_ud(vcpu);
}
EXPORT_SYMBOL_GPL(kairos_ud_handle_ud);

/* ---------------- arm / disarm / peek, on a vCPU thread ---------------- */

static void kairos_set_armed(struct kairos_vm *vm, unsigned int idx, bool on, gpa_t gpa)
{
	if (on) {
		vm->armed |= BIT_ULL(idx);
		vm->patch_gpa[idx] = gpa;
	} else {
		vm->armed &= ~BIT_ULL(idx);
	}
	WRITE_ONCE(vm->ring->hdr->armed_mask, vm->armed);
}

static int kairos_do_op(struct kairos_vm *vm, struct kvm_vcpu *vcpu, struct kairos_ud_ctl *ctl)
{
	u8 cur[KAIROS_UD_SITE_LEN], want;
	struct kairos_table *t;
	gpa_t gpa, gpa1;
	u64 gva;
	bool arm = ctl->op == KAIROS_UD_OP_ARM;

	if (is_guest_mode(vcpu) || vcpu->arch.guest_state_protected)
		return -EBUSY;
	if (ctl->op == KAIROS_UD_OP_PEEK) {
		gpa = kairos_gva_to_gpa(vcpu, ctl->gva);
		if (gpa == INVALID_GPA)
			return -EFAULT;
		ctl->gpa = gpa;
		return kairos_read_gva(vcpu, ctl->gva, ctl->bytes, ctl->len);
	}

	t = rcu_dereference_protected(vm->table, 1);	/* the waiting ioctl holds vm->lock */
	if (!t || ctl->index >= t->nr)
		return -ENOENT;
	gva = t->t[ctl->index].gva;
	gpa = kairos_gva_to_gpa(vcpu, gva);
	gpa1 = kairos_gva_to_gpa(vcpu, gva + 1);
	if (gpa == INVALID_GPA || gpa1 == INVALID_GPA)
		return -EFAULT;
	ctl->gpa = gpa;
	if (kairos_read_gva(vcpu, gva, cur, sizeof(cur)))
		return -EFAULT;
	memcpy(ctl->bytes, cur, sizeof(cur));

	if (!memcmp(cur, arm ? kairos_ud5 : kairos_nop5, sizeof(cur))) {
		/* already in the wanted state (ours from before, or restored by someone) */
		if (arm && !(vm->armed & BIT_ULL(ctl->index)))
			return -EBADMSG;	/* a UD2 we did not write: not a site to take over */
		kairos_set_armed(vm, ctl->index, arm, gpa1);
		return 0;
	}
	if (memcmp(cur, arm ? kairos_nop5 : kairos_ud5, sizeof(cur)))
		return -EBADMSG;	/* not the bytes we expect: refuse, write nothing */

	want = arm ? kairos_ud5[1] : kairos_nop5[1];
	if (kvm_vcpu_write_guest(vcpu, gpa1, &want, 1))
		return -EFAULT;
	if (kairos_read_gva(vcpu, gva, cur, sizeof(cur)))
		return -EFAULT;
	memcpy(ctl->bytes, cur, sizeof(cur));
	if (memcmp(cur, arm ? kairos_ud5 : kairos_nop5, sizeof(cur)))
		return -EIO;
	kairos_set_armed(vm, ctl->index, arm, gpa1);
	return 0;
}

void kairos_ud_vcpu_run(struct kvm_vcpu *vcpu)
{
	struct kairos_op *op = NULL;
	struct kairos_vm *vm;

	if (likely(!atomic_read(&kairos_ops_pending)))
		return;
	rcu_read_lock();
	vm = kairos_find(vcpu->kvm);
	rcu_read_unlock();
	if (!vm)
		return;
	spin_lock(&vm->op_lock);
	if (vm->op && vm->op->vcpu_idx == vcpu->vcpu_idx) {
		op = vm->op;
		vm->op = NULL;
		atomic_dec(&kairos_ops_pending);
	}
	spin_unlock(&vm->op_lock);
	if (!op)
		return;
	op->ctl->result = kairos_do_op(vm, vcpu, op->ctl);
	complete(&op->done);
}
EXPORT_SYMBOL_GPL(kairos_ud_vcpu_run);

/* Hand ctl to a vCPU thread and wait.  Caller holds vm->lock. */
static int kairos_run_op(struct kairos_vm *vm, struct kairos_ud_ctl *ctl)
{
	struct kvm *kvm = vm->kvm;
	struct kairos_op op = { .ctl = ctl };
	struct kvm_vcpu *vcpu;
	long left;

	if (ctl->vcpu >= atomic_read(&kvm->online_vcpus))
		return -EINVAL;
	vcpu = kvm_get_vcpu(kvm, ctl->vcpu);
	if (!vcpu)
		return -EINVAL;
	op.vcpu_idx = vcpu->vcpu_idx;
	init_completion(&op.done);
	ctl->result = -EINPROGRESS;

	spin_lock(&vm->op_lock);
	vm->op = &op;
	atomic_inc(&kairos_ops_pending);
	spin_unlock(&vm->op_lock);
	/* A halted vCPU leaves kvm_vcpu_halt() on KVM_REQ_UNBLOCK; a running one exits on the kick. */
	kvm_make_request(KVM_REQ_UNBLOCK, vcpu);
	kvm_vcpu_kick(vcpu);

	left = wait_for_completion_killable_timeout(&op.done,
			msecs_to_jiffies(ctl->timeout_ms ? min_t(u32, ctl->timeout_ms, KAIROS_MAX_TMO_MS) :
					 KAIROS_DEFAULT_TMO_MS));
	if (left <= 0) {
		spin_lock(&vm->op_lock);
		if (vm->op == &op) {		/* never taken: cancel, nothing was done */
			vm->op = NULL;
			atomic_dec(&kairos_ops_pending);
			spin_unlock(&vm->op_lock);
			return left ? -EINTR : -ETIMEDOUT;
		}
		spin_unlock(&vm->op_lock);
		wait_for_completion(&op.done);	/* taken: bounded work, finishes */
	}
	return ctl->result;
}

/* ---------------- restore at teardown ---------------- */

/*
 * Put the NOP back into every armed site through QEMU's address space: from
 * the mmu notifier's ->release (QEMU exiting: mm_users is 0 but the mappings
 * are still there) or from mmu_notifier_unregister() at VM destruction.
 */
static void kairos_restore_remote(struct kairos_vm *vm, struct mm_struct *mm)
{
	struct kvm *kvm = vm->kvm;
	unsigned int i, restored = 0, failed = 0;
	int idx;

	idx = srcu_read_lock(&kvm->srcu);
	for (i = 0; i < KAIROS_UD_MAX_TRAPS; i++) {
		unsigned long hva, off;
		struct page *page;
		long n;
		u8 *p;

		if (!(vm->armed & BIT_ULL(i)))
			continue;
		hva = gfn_to_hva(kvm, gpa_to_gfn(vm->patch_gpa[i]));
		if (kvm_is_error_hva(hva)) {
			failed++;
			continue;
		}
		hva += offset_in_page(vm->patch_gpa[i]);
		mmap_read_lock(mm);
		n = get_user_pages_remote(mm, hva, 1, FOLL_WRITE | FOLL_FORCE, &page, NULL, NULL);
		mmap_read_unlock(mm);
		if (n != 1) {
			failed++;
			continue;
		}
		p = kmap_local_page(page);
		off = offset_in_page(hva);
		/* Ours only if the byte (and the rest of the site, where it is on this page) still reads armed. */
		if (p[off] == kairos_ud5[1] && (off == 0 || p[off - 1] == kairos_ud5[0]) &&
		    (off + 3 >= PAGE_SIZE || !memcmp(p + off + 1, kairos_ud5 + 2, 3)))
			p[off] = kairos_nop5[1];
		kunmap_local(p);
		set_page_dirty_lock(page);
		put_page(page);
		vm->armed &= ~BIT_ULL(i);
		restored++;
	}
	srcu_read_unlock(&kvm->srcu, idx);
	WRITE_ONCE(vm->ring->hdr->armed_mask, vm->armed);
	if (restored || failed)
		pr_info("VM %d: restored %u armed site(s) at teardown, %u could not be\n",
			task_tgid_nr(current), restored, failed);
}

static void kairos_mn_release(struct mmu_notifier *mn, struct mm_struct *mm)
{
	struct kairos_vm *vm = container_of(mn, struct kairos_vm, mn);

	mutex_lock(&vm->lock);
	if (vm->armed)
		kairos_restore_remote(vm, mm);
	mutex_unlock(&vm->lock);
}

static const struct mmu_notifier_ops kairos_mn_ops = {
	.release = kairos_mn_release,
};

void kairos_ud_destroy_vm(struct kvm *kvm)
{
	struct kairos_table *t;
	struct kairos_vm *vm;

	mutex_lock(&kairos_vms_mutex);
	rcu_read_lock();
	vm = kairos_find(kvm);
	rcu_read_unlock();
	if (vm) {
		hash_del_rcu(&vm->node);
		atomic_dec(&kairos_nr_vms);
	}
	mutex_unlock(&kairos_vms_mutex);
	if (!vm)
		return;
	synchronize_rcu();

	/* Calls ->release if QEMU's mm has not been torn down yet: the sites are restored there. */
	if (vm->mn_registered)
		mmu_notifier_unregister(&vm->mn, kvm->mm);
	if (vm->armed)
		pr_info("VM destroyed with %u site(s) armed: its memory is gone with QEMU\n",
			(unsigned int)hweight64(vm->armed));

	t = rcu_dereference_protected(vm->table, 1);
	kfree(t);
	if (vm->evfd)
		eventfd_ctx_put(vm->evfd);
	kref_put(&vm->ring->ref, kairos_ring_free);
	kfree(vm);
}
EXPORT_SYMBOL_GPL(kairos_ud_destroy_vm);

/* ---------------- ioctls ---------------- */

static struct kairos_vm *kairos_vm_get_or_create(struct kvm *kvm, u32 nr, int *err)
{
	struct kairos_vm *vm;

	mutex_lock(&kairos_vms_mutex);
	rcu_read_lock();
	vm = kairos_find(kvm);
	rcu_read_unlock();
	if (vm)
		goto out;

	*err = -ENOMEM;
	vm = kzalloc(sizeof(*vm), GFP_KERNEL_ACCOUNT);
	if (!vm)
		goto out;
	vm->kvm = kvm;
	mutex_init(&vm->lock);
	spin_lock_init(&vm->ring_lock);
	spin_lock_init(&vm->op_lock);
	vm->tb_cost = NSEC_PER_SEC / KAIROS_DEFAULT_RATE;
	vm->tb_max = vm->tb_credit = vm->tb_cost * KAIROS_DEFAULT_BURST;
	vm->tb_last = ktime_get_ns();
	vm->ring = kairos_ring_alloc(nr);
	if (!vm->ring)
		goto fail;
	/* Our own notifier on QEMU's mm, for the restore at teardown. */
	*err = -EIO;
	if (!mmget_not_zero(kvm->mm))
		goto fail;
	vm->mn.ops = &kairos_mn_ops;
	*err = mmu_notifier_register(&vm->mn, kvm->mm);
	mmput(kvm->mm);
	if (*err)
		goto fail;
	vm->mn_registered = true;
	hash_add_rcu(kairos_vms, &vm->node, (unsigned long)kvm);
	atomic_inc(&kairos_nr_vms);
	goto out;
fail:
	if (vm->ring)
		kref_put(&vm->ring->ref, kairos_ring_free);
	kfree(vm);
	vm = NULL;
out:
	mutex_unlock(&kairos_vms_mutex);
	return vm;
}

static long kairos_setup(struct kvm *kvm, void __user *argp)
{
	struct eventfd_ctx *evfd = NULL, *old;
	struct kairos_ud_setup s;
	struct kairos_vm *vm;
	struct file *file;
	int fd, err = 0;
	u32 nr;

	if (copy_from_user(&s, argp, sizeof(s)))
		return -EFAULT;
	if (s.flags)
		return -EINVAL;
	nr = s.nr_events ? s.nr_events : 1024;
	if (!is_power_of_2(nr) || nr < 16 || nr > 65536)
		return -EINVAL;
	if (s.eventfd >= 0) {
		evfd = eventfd_ctx_fdget(s.eventfd);
		if (IS_ERR(evfd))
			return PTR_ERR(evfd);
	}
	vm = kairos_vm_get_or_create(kvm, nr, &err);
	if (!vm) {
		if (evfd)
			eventfd_ctx_put(evfd);
		return err;
	}

	mutex_lock(&vm->lock);
	fd = get_unused_fd_flags(O_RDWR | O_CLOEXEC);
	if (fd < 0) {
		err = fd;
		goto out;
	}
	kref_get(&vm->ring->ref);
	file = anon_inode_getfile("[kairos-ud]", &kairos_ring_fops, vm->ring, O_RDWR);
	if (IS_ERR(file)) {
		kref_put(&vm->ring->ref, kairos_ring_free);
		put_unused_fd(fd);
		err = PTR_ERR(file);
		goto out;
	}
	s.ring_fd = fd;
	s.ring_size = vm->ring->size;
	s.api_version = KAIROS_UD_API_VERSION;
	if (copy_to_user(argp, &s, sizeof(s))) {
		fput(file);
		put_unused_fd(fd);
		err = -EFAULT;
		goto out;
	}
	fd_install(fd, file);
	if (evfd) {
		spin_lock(&vm->ring_lock);
		old = vm->evfd;
		vm->evfd = evfd;
		spin_unlock(&vm->ring_lock);
		evfd = old;
	}
out:
	mutex_unlock(&vm->lock);
	if (evfd)
		eventfd_ctx_put(evfd);
	return err;
}

static int kairos_check_trap(const struct kairos_ud_trap *t)
{
	unsigned int i, total = 0;

	if (t->nfetch > KAIROS_UD_MAX_FETCH)
		return -EINVAL;
	for (i = 0; i < t->nfetch; i++) {
		const struct kairos_ud_fetch *f = &t->fetch[i];

		if (f->flags || !f->len || f->len > KAIROS_UD_DATA_MAX || f->base > KAIROS_UD_BASE_PREV)
			return -EINVAL;
		if (f->base == KAIROS_UD_BASE_PREV && (i == 0 || t->fetch[i - 1].len < 8))
			return -EINVAL;
		total += f->len;
	}
	return total > KAIROS_UD_DATA_MAX ? -E2BIG : 0;
}

static long kairos_set_traps(struct kairos_vm *vm, void __user *argp)
{
	struct kairos_table *t, *old;
	struct kairos_ud_traps a;
	unsigned int i, j;
	long r;

	if (copy_from_user(&a, argp, sizeof(a)))
		return -EFAULT;
	if (a.flags || a.nr > KAIROS_UD_MAX_TRAPS || a.rate > NSEC_PER_SEC)
		return -EINVAL;
	t = kzalloc(struct_size(t, t, a.nr), GFP_KERNEL_ACCOUNT);
	if (!t)
		return -ENOMEM;
	t->nr = a.nr;
	if (copy_from_user(t->t, u64_to_user_ptr(a.traps), a.nr * sizeof(t->t[0]))) {
		kfree(t);
		return -EFAULT;
	}
	for (i = 0; i < a.nr; i++) {
		r = kairos_check_trap(&t->t[i]);
		for (j = 0; !r && j < i; j++)
			if (t->t[j].gva == t->t[i].gva)
				r = -EEXIST;
		if (r) {
			kfree(t);
			return r;
		}
	}

	mutex_lock(&vm->lock);
	old = rcu_dereference_protected(vm->table, lockdep_is_held(&vm->lock));
	for (i = 0; i < KAIROS_UD_MAX_TRAPS; i++) {
		if (!(vm->armed & BIT_ULL(i)))
			continue;
		if (i >= a.nr || !old || t->t[i].gva != old->t[i].gva) {
			mutex_unlock(&vm->lock);
			kfree(t);
			return -EBUSY;	/* disarm it first */
		}
	}
	spin_lock(&vm->ring_lock);
	vm->tb_cost = NSEC_PER_SEC / (a.rate ? a.rate : KAIROS_DEFAULT_RATE);
	vm->tb_max = vm->tb_credit = vm->tb_cost * (a.burst ? a.burst : KAIROS_DEFAULT_BURST);
	vm->tb_last = ktime_get_ns();
	spin_unlock(&vm->ring_lock);
	rcu_assign_pointer(vm->table, t);
	mutex_unlock(&vm->lock);
	if (old)
		kfree_rcu(old, rcu);
	return 0;
}

static long kairos_ctl(struct kairos_vm *vm, void __user *argp)
{
	struct kairos_ud_ctl c;
	long r;

	if (copy_from_user(&c, argp, sizeof(c)))
		return -EFAULT;
	switch (c.op) {
	case KAIROS_UD_OP_ARM:
	case KAIROS_UD_OP_DISARM:
		if (c.index >= KAIROS_UD_MAX_TRAPS)
			return -EINVAL;
		break;
	case KAIROS_UD_OP_PEEK:
		if (!c.len || c.len > KAIROS_UD_PEEK_MAX)
			return -EINVAL;
		break;
	default:
		return -EINVAL;
	}
	memset(c.bytes, 0, sizeof(c.bytes));
	c.gpa = 0;
	mutex_lock(&vm->lock);
	r = kairos_run_op(vm, &c);
	mutex_unlock(&vm->lock);
	c.result = r;
	if (copy_to_user(argp, &c, sizeof(c)))
		return -EFAULT;
	return r;
}

/*
 * Called by kvm_vm_ioctl() before its same-mm check: the caller may be another
 * process (the agent).  Nothing here touches guest memory directly.
 */
long kairos_ud_vm_ioctl(struct kvm *kvm, unsigned int ioctl, unsigned long arg)
{
	void __user *argp = (void __user *)arg;
	struct kairos_vm *vm;

	if (ioctl == KAIROS_UD_SETUP)
		return kairos_setup(kvm, argp);

	rcu_read_lock();
	vm = kairos_find(kvm);	/* freed only at VM destruction: not while an ioctl holds the fd */
	rcu_read_unlock();
	if (!vm)
		return -ENXIO;	/* KAIROS_UD_SETUP first */
	switch (ioctl) {
	case KAIROS_UD_SET_TRAPS:
		return kairos_set_traps(vm, argp);
	case KAIROS_UD_CTL:
		return kairos_ctl(vm, argp);
	}
	return -ENOTTY;
}
EXPORT_SYMBOL_GPL(kairos_ud_vm_ioctl);
