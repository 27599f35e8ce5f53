/* i386: a multiboot (v1) kernel. QEMU's loader enters _start in 32-bit protected mode, paging off. */

        .section .multiboot, "a"
        .p2align 2
        .long 0x1BADB002
        .long 0
        .long -0x1BADB002

        .text
        .code32
        .globl _start
_start:
        cli
        lgdt gdtdesc
        ljmp $0x18, $1f
1:      movw $0x10, %ax
        movw %ax, %ds
        movw %ax, %es
        movw %ax, %ss
        movw %ax, %fs
        movw %ax, %gs
        movl $stack0_top, %esp
        xorl %ebp, %ebp
        call cpu0_main
2:      hlt
        jmp 2b

        .globl ap_entry32
ap_entry32:
        movw $0x10, %ax
        movw %ax, %ds
        movw %ax, %es
        movw %ax, %ss
        movl $stack1_top, %esp
        xorl %ebp, %ebp
        call ap_main
3:      hlt
        jmp 3b
