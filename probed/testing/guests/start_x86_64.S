/* x86_64: entered through the PVH ELF note (XEN_ELFNOTE_PHYS32_ENTRY): 32-bit protected mode, paging off.
 * Identity-map the first 4 GiB with 2 MiB pages (the local APIC at 0xFEE00000 included), enable long
 * mode and call the C main on each CPU. */

        .section .note.Xen, "a", @note
        .p2align 2
        .long 4                 /* name size */
        .long 8                 /* desc size */
        .long 18                /* XEN_ELFNOTE_PHYS32_ENTRY */
        .asciz "Xen"
        .p2align 2
        .quad _start

        .text
        .code32
        .globl _start
_start:
        cli
        movl $stack0_top, %esp
        /* pml4[0] -> pdpt; pdpt[i] -> pd + i*4096 (i < 4); pd entries 2 MiB pages */
        movl $pdpt, %eax
        orl $3, %eax
        movl %eax, pml4
        xorl %ecx, %ecx
1:      movl %ecx, %eax
        shll $12, %eax
        addl $pd, %eax
        orl $3, %eax
        movl %eax, pdpt(,%ecx,8)
        incl %ecx
        cmpl $4, %ecx
        jne 1b
        xorl %ecx, %ecx
2:      movl %ecx, %eax
        shll $21, %eax
        orl $0x83, %eax                 /* present, writable, 2 MiB */
        movl %eax, pd(,%ecx,8)
        movl %ecx, %eax
        shrl $11, %eax                  /* high dword: bits 32+ of the address */
        movl %eax, pd+4(,%ecx,8)
        incl %ecx
        cmpl $2048, %ecx
        jne 2b
        movl $stack0_top, %edi
        movl $cpu0_main, %esi
        jmp enter_long

        .globl ap_entry32
ap_entry32:
        movw $0x10, %ax
        movw %ax, %ds
        movw %ax, %es
        movw %ax, %ss
        movl $stack1_top, %edi
        movl $ap_main, %esi
        /* fall through */

/* edi: stack top, esi: the C function to call in long mode */
enter_long:
        lgdt gdtdesc
        movl %cr4, %eax
        orl $0x20, %eax                 /* PAE */
        movl %eax, %cr4
        movl $pml4, %eax
        movl %eax, %cr3
        movl $0xC0000080, %ecx          /* EFER */
        rdmsr
        orl $0x100, %eax                /* LME */
        wrmsr
        movl %cr0, %eax
        orl $0x80000001, %eax           /* PG | PE */
        movl %eax, %cr0
        ljmp $0x08, $long_mode

        .code64
long_mode:
        movw $0x10, %ax
        movw %ax, %ds
        movw %ax, %es
        movw %ax, %ss
        movw %ax, %fs
        movw %ax, %gs
        movl %edi, %esp
        xorl %ebp, %ebp
        movl %esi, %esi
        call *%rsi
3:      hlt
        jmp 3b

        .bss
        .p2align 12
pml4:   .skip 4096
pdpt:   .skip 4096
pd:     .skip 4 * 4096
