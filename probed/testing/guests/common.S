/* Pieces both guests share: reg_change, and the start of the AP trampoline (real mode, copied to 0x8000). */

        .text
        .globl reg_change, reg_change_insn
        .type reg_change, @function
reg_change:
        mov $0x11111111, %eax
        .type reg_change_insn, @function
reg_change_insn:
        mov $0x22222222, %eax
        ret
        .size reg_change_insn, . - reg_change_insn
        .size reg_change, . - reg_change

/* The AP starts in real mode at 0x8000 (SIPI vector 0x08). Switch to 32-bit protected mode with our GDT
 * and jump to ap_entry32 (arch-specific). Addresses inside the trampoline are relative to 0x8000. */
        .globl ap_tramp_start, ap_tramp_end
        .code16
ap_tramp_start:
        cli
        xorw %ax, %ax
        movw %ax, %ds
        lgdtl (tramp_gdtdesc - ap_tramp_start + 0x8000)
        movl %cr0, %eax
        orl $1, %eax
        movl %eax, %cr0
        ljmpl $0x18, $ap_entry32
        .p2align 3
tramp_gdtdesc:
        .word gdt_end - gdt - 1
        .long gdt
ap_tramp_end:
        .code32

/* GDT: 0x08 code (64-bit on x86_64, 32-bit on i386), 0x10 data, 0x18 32-bit code. */
        .data
        .p2align 3
        .globl gdt, gdtdesc
gdt:
        .quad 0
#ifdef __x86_64__
        .quad 0x00AF9A000000FFFF
#else
        .quad 0x00CF9A000000FFFF
#endif
        .quad 0x00CF92000000FFFF
        .quad 0x00CF9A000000FFFF
gdt_end:
gdtdesc:
        .word gdt_end - gdt - 1
        .long gdt
        .long 0

        .bss
        .p2align 4
        .globl stack0_top, stack1_top
        .skip 16384
stack0_top:
        .skip 16384
stack1_top:
