/*
 * Ferry's silent test kernel: a PVH image that never prints. Every vCPU
 * increments one word in each page of [16 MiB, 32 MiB) forever, so the
 * guest has memory worth moving but says nothing on any port. Tests use it
 * as a `--kernel` guest to show that migration never waits on guest output.
 *
 *   pvh_entry  32-bit protected mode, paging off (PVH).
 *   _start64   64-bit, for loaders without PVH (identity-mapped low memory).
 */

#define FIRST	0x1000000
#define END	0x2000000

#include "pvh_note.h"

	.section .text.boot, "ax"
	.code32
	.globl	pvh_entry
pvh_entry:
	cli
1:	movl	$FIRST, %edi
2:	incl	(%edi)
	addl	$4096, %edi
	cmpl	$END, %edi
	jb	2b
	pause
	jmp	1b

	.code64
	.globl	_start64
_start64:
	cli
3:	movq	$FIRST, %rdi
4:	incl	(%rdi)
	addq	$4096, %rdi
	cmpq	$END, %rdi
	jb	4b
	pause
	jmp	3b

	.section .note.GNU-stack, "", @progbits
