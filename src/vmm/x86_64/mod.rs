//! x86_64 boot: kernel loading, the zero page, the MP table and the entry CPU state.

pub mod gdt;
pub mod linux;
pub mod mptable;
pub mod page_tables;
pub mod regs;
pub mod zero_page;
