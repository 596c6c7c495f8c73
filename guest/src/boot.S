/*
 * Ferry workload guest: entry points, boot page tables, GDT, interrupt
 * stubs and the register check.
 *
 * Two ways in, both ending in common64 -> guest_main(idx, start_info):
 *
 *   pvh_entry  (32-bit, named by the XEN_ELFNOTE_PHYS32_ENTRY note)
 *       Protected mode, paging off, EBX = &hvm_start_info.  We switch to
 *       long mode using the static 1 GiB identity map below.
 *
 *   _start64   (64-bit, the ELF e_entry)
 *       Long mode on, the VMM's identity map covers >= 1 GiB,
 *       RBX = &hvm_start_info, RSP undefined.  We load our own GDT and CR3.
 *
 * Every vCPU may enter at the same time.  Each one derives its index from
 * its initial APIC ID (CPUID.1:EBX[31:24]) and picks its own stack before
 * anything touches a stack.
 *
 * After setup each CPU drops to ring 3 (enter_user) and runs the workload
 * there; ring 0 only handles interrupts and exceptions.  See lib.rs for why.
 */

#define MAX_CPUS	8
/* Per CPU 32 KiB: user stack in the low half, kernel stack in the high
 * half, so (rsp - boot_stacks) >> STACK_SHIFT is the CPU index in both
 * privilege levels. */
#define STACK_SHIFT	15
#define STACK_SIZE	(1 << STACK_SHIFT)

#define SEL_CODE64	0x08
#define SEL_DATA	0x10
#define SEL_UDATA	(0x18 | 3)
#define SEL_UCODE64	(0x20 | 3)

#define MSR_EFER	0xc0000080
#define EFER_LME	(1 << 8)
#define CR0_PE		(1 << 0)
#define CR0_PG		(1 << 31)
#define CR4_PAE		(1 << 5)

/* ------------------------------------------------------------ PVH note */

#include "pvh_note.h"

/* ------------------------------------------------------ 32-bit entry */

	.section .text.boot, "ax"
	.code32
	.globl	pvh_entry
pvh_entry:
	cli
	cld
	movl	%ebx, %esi		/* start_info; CPUID clobbers EBX */
	movl	$1, %eax
	cpuid
	shrl	$24, %ebx		/* initial APIC ID */
	cmpl	$MAX_CPUS, %ebx
	jae	park32
	movl	%ebx, %edi		/* CPU index */

	lgdt	boot_gdt_desc

	movl	%cr4, %eax
	orl	$CR4_PAE, %eax
	movl	%eax, %cr4

	movl	$boot_pml4, %eax
	movl	%eax, %cr3

	movl	$MSR_EFER, %ecx
	rdmsr
	orl	$EFER_LME, %eax
	wrmsr

	movl	%cr0, %eax
	orl	$(CR0_PG | CR0_PE), %eax
	movl	%eax, %cr0

	ljmp	$SEL_CODE64, $entry64_from32

park32:
	hlt
	jmp	park32

	.code64
entry64_from32:
	/* Upper halves of GPRs are undefined after the mode switch. */
	movl	%esi, %esi
	movl	%edi, %edi
	jmp	common64

/* ------------------------------------------------------ 64-bit entry */

	.globl	_start64
_start64:
	cli
	cld
	movq	%rbx, %rsi		/* start_info */
	movl	$1, %eax
	cpuid
	shrl	$24, %ebx
	cmpl	$MAX_CPUS, %ebx
	jae	park64
	movl	%ebx, %edi

	/* Our GDT, and reload CS through a far return (no stack yet, so
	 * borrow the top of this CPU's stack for the two words). */
	lgdt	boot_gdt_desc(%rip)
	leaq	boot_stacks(%rip), %rsp
	movq	%rdi, %rax
	incq	%rax
	shlq	$STACK_SHIFT, %rax
	addq	%rax, %rsp
	pushq	$SEL_CODE64
	leaq	1f(%rip), %rax
	pushq	%rax
	lretq
1:
	/* Same static page tables as the 32-bit path (they map the first
	 * GiB, where we run), so both paths are in the same state. */
	leaq	boot_pml4(%rip), %rax
	movq	%rax, %cr3
	jmp	common64

park64:
	cli
	hlt
	jmp	park64

/* edi = CPU index, rsi = start_info physical address. */
common64:
	movw	$SEL_DATA, %ax
	movw	%ax, %ds
	movw	%ax, %es
	movw	%ax, %ss
	xorl	%eax, %eax
	movw	%ax, %fs
	movw	%ax, %gs

	leaq	boot_stacks(%rip), %rsp
	movq	%rdi, %rax
	incq	%rax
	shlq	$STACK_SHIFT, %rax
	addq	%rax, %rsp
	xorl	%ebp, %ebp

	call	guest_main		/* guest_main(idx, start_info) */
2:
	cli
	hlt
	jmp	2b

/*
 * noreturn void enter_user(void (*fn)(u64), u64 user_rsp, u64 arg)
 * iretq to ring 3 at fn(arg) on user_rsp, with interrupts enabled.
 * The kernel stack is abandoned: the TSS's rsp0 points at its top.
 */
	.globl	enter_user
enter_user:
	pushq	$SEL_UDATA		/* ss */
	pushq	%rsi			/* rsp */
	pushq	$0x202			/* rflags: IF */
	pushq	$SEL_UCODE64		/* cs */
	pushq	%rdi			/* rip */
	movq	%rdx, %rdi
	xorl	%eax, %eax
	movw	%ax, %ds
	movw	%ax, %es
	iretq

/* ---------------------------------------------------- interrupt stubs */

/*
 * One 16-byte stub per vector: push a dummy error code where the CPU does
 * not push one, push the vector number, jump to the common path.
 * The IDT entry for vector n points at isr_stubs + 16 * n.
 */
	.text
	.balign 16
	.globl	isr_stubs
isr_stubs:
	.set	vec, 0
	.rept	256
	.balign 16
	.if (vec == 8) || (vec >= 10 && vec <= 14) || (vec == 17) || (vec == 21) || (vec == 29) || (vec == 30)
	.else
	pushq	$0
	.endif
	pushq	$vec
	jmp	isr_common
	.set	vec, vec + 1
	.endr

/*
 * Save the caller-saved registers (trap_handler preserves the rest; C is
 * compiled with -mgeneral-regs-only, so no vector register is touched)
 * and call trap_handler(frame).  The frame is struct trap_frame in
 * guest.h.  The stack is 16-byte aligned at the call: 40 bytes CPU frame
 * + err + vec + 9 saved registers = 128.
 */
isr_common:
	pushq	%rax
	pushq	%rcx
	pushq	%rdx
	pushq	%rsi
	pushq	%rdi
	pushq	%r8
	pushq	%r9
	pushq	%r10
	pushq	%r11
	movq	%rsp, %rdi
	cld
	call	trap_handler
	popq	%r11
	popq	%r10
	popq	%r9
	popq	%r8
	popq	%rdi
	popq	%rsi
	popq	%rdx
	popq	%rcx
	popq	%rax
	addq	$16, %rsp
	iretq

/*
 * void ferry_syscall(void): the ring 3 -> ring 0 call.  PVM (the KVM
 * flavour this project is tested on) turns `int $n` from ring 3 into #UD,
 * but delivers real exceptions fine, so the call is a `ud2` at this one
 * address: trap_handler recognises it, skips it, and returns.
 */
	.globl	ferry_syscall
ferry_syscall:
	ud2
	ret

/* ------------------------------------------------------ register check */

/*
 * u32 regcheck(const struct regvals *v, u64 spin_cycles, u64 avx, u64 inject)
 *
 * struct regvals: +0 rbx, r12, r13, r14, r15 (5 x 8 bytes)
 *                 +40 xmm8..xmm15 (8 x 16 bytes)
 *                 +168 upper halves of ymm8..ymm15 (8 x 16 bytes)
 *
 * Loads the values, spins with `pause` until spin_cycles TSC cycles have
 * passed (interrupts stay enabled, so timer interrupts and VM exits land
 * in the window), then compares every register against memory.
 * Returns the mismatch mask: bit 0 rbx, 1-4 r12-r15, 5-12 xmm8-15,
 * 13-20 ymm8-15 upper halves.  A non-zero `inject` (self-test) flips r13
 * and xmm12 at the end of the window.
 */
	.globl	regcheck
regcheck:
	pushq	%rbx
	pushq	%rbp
	pushq	%r12
	pushq	%r13
	pushq	%r14
	pushq	%r15
	movq	%rdi, %rbp		/* v */
	movq	%rsi, %r8		/* spin cycles */
	movq	%rdx, %r9		/* avx */

	movq	0(%rbp), %rbx
	movq	8(%rbp), %r12
	movq	16(%rbp), %r13
	movq	24(%rbp), %r14
	movq	32(%rbp), %r15
	.irp	n, 8, 9, 10, 11, 12, 13, 14, 15
	movdqu	(40 + 16 * (\n - 8))(%rbp), %xmm\n
	.endr
	testq	%r9, %r9
	jz	1f
	.irp	n, 8, 9, 10, 11, 12, 13, 14, 15
	vinsertf128 $1, (168 + 16 * (\n - 8))(%rbp), %ymm\n, %ymm\n
	.endr
1:
	rdtsc
	shlq	$32, %rdx
	orq	%rdx, %rax
	leaq	(%rax, %r8), %r10	/* deadline */
2:
	pause
	rdtsc
	shlq	$32, %rdx
	orq	%rdx, %rax
	cmpq	%r10, %rax
	jb	2b

	testq	%rcx, %rcx		/* self-test: corrupt two registers */
	jz	5f
	xorq	$1, %r13
	pcmpeqb	%xmm0, %xmm0
	pxor	%xmm0, %xmm12
5:

	xorl	%r11d, %r11d		/* mismatch mask */

	.macro	CHECK_GPR reg, off, bit
	cmpq	\off(%rbp), \reg
	je	3f
	orl	$(1 << \bit), %r11d
3:
	.endm
	CHECK_GPR %rbx, 0, 0
	CHECK_GPR %r12, 8, 1
	CHECK_GPR %r13, 16, 2
	CHECK_GPR %r14, 24, 3
	CHECK_GPR %r15, 32, 4

	.irp	n, 8, 9, 10, 11, 12, 13, 14, 15
	movdqu	(40 + 16 * (\n - 8))(%rbp), %xmm0
	pcmpeqb	%xmm\n, %xmm0
	pmovmskb %xmm0, %eax
	cmpl	$0xffff, %eax
	je	3f
	orl	$(1 << (5 + \n - 8)), %r11d
3:
	.endr

	testq	%r9, %r9
	jz	4f
	.irp	n, 8, 9, 10, 11, 12, 13, 14, 15
	vextractf128 $1, %ymm\n, %xmm0
	vmovdqu	(168 + 16 * (\n - 8))(%rbp), %xmm1
	vpcmpeqb %xmm1, %xmm0, %xmm0
	vpmovmskb %xmm0, %eax
	cmpl	$0xffff, %eax
	je	3f
	orl	$(1 << (13 + \n - 8)), %r11d
3:
	.endr
	vzeroupper
4:
	movl	%r11d, %eax
	popq	%r15
	popq	%r14
	popq	%r13
	popq	%r12
	popq	%rbp
	popq	%rbx
	ret

/* ---------------------------------------------------------------- data */

	.data
	.balign 16
	.globl	gdt
gdt:
	.quad	0			/* null */
	.quad	0x00af9a000000ffff	/* 0x08: 64-bit code, DPL 0 */
	.quad	0x00cf92000000ffff	/* 0x10: flat data */
	.quad	0x00cff2000000ffff	/* 0x18: flat data, DPL 3 */
	.quad	0x00affa000000ffff	/* 0x20: 64-bit code, DPL 3 */
	.fill	2 * MAX_CPUS, 8, 0	/* 0x28 + 16 * i: TSS of CPU i (cpu.c) */
gdt_end:

	/* 2-byte limit + 8-byte base; 32-bit lgdt reads only the low 4 of
	 * the base, which is all there is since we live below 4 GiB. */
	.balign 16
boot_gdt_desc:
	.word	gdt_end - gdt - 1
	.quad	gdt

	.globl	boot_release
	.balign 4
boot_release:
	.long	0

/*
 * Static boot page tables: identity map of the first 1 GiB with 2 MiB
 * pages (PML4[0] -> PDPT[0] -> PD with 512 large pages).  Enough to run the
 * image and read start_info until the BSP builds the full map (mm.c).
 */
	.balign 4096
boot_pml4:
	.quad	boot_pdpt + 0x3		/* present | writable */
	.fill	511, 8, 0
boot_pdpt:
	.quad	boot_pd + 0x3
	.fill	511, 8, 0
boot_pd:
	.set	i, 0
	.rept	512
	.quad	(i << 21) | 0x83	/* present | writable | 2 MiB page */
	.set	i, i + 1
	.endr

	.bss
	.balign 4096
	.globl	boot_stacks
boot_stacks:
	.skip	MAX_CPUS * STACK_SIZE
boot_stacks_end:

	.section .note.GNU-stack, "", @progbits
