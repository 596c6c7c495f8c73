/*
 * The PVH entry note: XEN_ELFNOTE_PHYS32_ENTRY naming `pvh_entry`, the
 * 32-bit entry point that PVH loaders (linux-loader, QEMU) jump to.
 * Included by each kernel's assembler entry file.
 */
	.section .note.Xen, "a"
	.balign 4
	.long	4			/* namesz: "Xen\0" */
	.long	4			/* descsz */
	.long	18			/* XEN_ELFNOTE_PHYS32_ENTRY */
	.asciz	"Xen"
	.balign 4
	.long	pvh_entry
