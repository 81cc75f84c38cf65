//! Addresses of two spaces that a fault handler and a VMM hold side by side: where a page is in
//! the guest ([`GuestAddr`]) and where it is mapped in a process ([`HostAddr`]); and the number a
//! page goes by in ferry's bitmaps and pre-pagers ([`PageIndex`]). All are plain numbers, so a raw
//! `u64` would let one pass for another; these types keep them apart, as vm-memory's
//! `GuestAddress` does for the guest's side.

use std::fmt;

/// An address in the guest's physical address space.
#[derive(Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GuestAddr(pub u64);

/// An address in a process's virtual address space: this one's, or (for a peer's regions over
/// RDMA, or Firecracker's as its UFFD handshake names them) another's.
#[derive(Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HostAddr(pub u64);

macro_rules! address {
    ($t:ident, $name:literal) => {
        impl $t {
            /// The address `bytes` further on, or `None` past the end of the address space.
            pub fn checked_add(self, bytes: u64) -> Option<Self> {
                self.0.checked_add(bytes).map(Self)
            }

            /// The address rounded down to a multiple of `align` (a power of two: a page size).
            pub fn align_down(self, align: u64) -> Self {
                debug_assert!(align.is_power_of_two());
                Self(self.0 & !(align - 1))
            }

            /// Bytes from `base` to this address, or `None` if it lies below `base`.
            pub fn offset_from(self, base: Self) -> Option<u64> {
                self.0.checked_sub(base.0)
            }
        }

        impl fmt::Debug for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!($name, "({:#x})"), self.0)
            }
        }

        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{:#x}", self.0)
            }
        }

        impl fmt::LowerHex for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::LowerHex::fmt(&self.0, f)
            }
        }
    };
}

address!(GuestAddr, "GuestAddr");
address!(HostAddr, "HostAddr");

impl HostAddr {
    /// The address of `ptr`.
    pub fn of<T>(ptr: *const T) -> Self {
        HostAddr(ptr as usize as u64)
    }
}

/// A page's number in a guest's layout: region 0's pages first, then region 1's, and so on, from
/// 0 (the order of [`crate::MemoryLayout::regions`]). Not an address: page `n` of a guest whose
/// regions have holes between them is not at `n * page_size`.
#[derive(Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PageIndex(pub u64);

impl PageIndex {
    /// The page `pages` further on, or `None` past the last number.
    pub fn checked_add(self, pages: u64) -> Option<Self> {
        self.0.checked_add(pages).map(Self)
    }

    /// Pages from `base` to this one, or `None` if it comes before `base`.
    pub fn offset_from(self, base: Self) -> Option<u64> {
        self.0.checked_sub(base.0)
    }
}

impl fmt::Debug for PageIndex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PageIndex({})", self.0)
    }
}

impl fmt::Display for PageIndex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "page {}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_print_as_hex_and_do_arithmetic_without_wrapping() {
        assert_eq!(format!("{:?} {}", GuestAddr(0x1000), HostAddr(0x7f00)), "GuestAddr(0x1000) 0x7f00");
        assert_eq!(format!("{:#x}", HostAddr(255)), "0xff");
        assert_eq!(HostAddr(u64::MAX).checked_add(1), None);
        assert_eq!(GuestAddr(0x3000).offset_from(GuestAddr(0x1000)), Some(0x2000));
        assert_eq!(GuestAddr(0x1000).offset_from(GuestAddr(0x3000)), None);
        assert_eq!(HostAddr(0x1fff).align_down(4096), HostAddr(0x1000));
    }

    #[test]
    fn page_indices_print_as_pages_and_count_without_wrapping() {
        assert_eq!(format!("{:?}, {}", PageIndex(7), PageIndex(7)), "PageIndex(7), page 7");
        assert_eq!(PageIndex(u64::MAX).checked_add(1), None);
        assert_eq!(PageIndex(9).offset_from(PageIndex(4)), Some(5));
        assert_eq!(PageIndex(4).offset_from(PageIndex(9)), None);
    }
}
