//! Counters are declared once, with [`counters!`]: one line per counter gives the shared
//! struct's field, its sum over CPUs, its column in `parsrv status`, its JSON key, its
//! Prometheus name and help, and (for fail-open errors) the program's index of it.

/// One counter as people see it: its field (and JSON key), its column in `parsrv status`, and
/// the help of its Prometheus metric.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Counter {
    pub name: &'static str,
    pub column: &'static str,
    pub help: &'static str,
}

/// Declares a struct of `u64` counters once: the `#[repr(C)]` Pod struct both sides share
/// (each field documented by its help text), its per-CPU sum (`add`), its values in field
/// order (`values`) and the description of each (`COUNTERS`), from which userspace builds
/// the status columns, the JSON keys and the metrics.
///
/// With `index enum Name`, each counter also gets a variant `Name::Variant` whose value is
/// the field's position: the program counts an event by index (`increment`), without a
/// hand-kept table of positions.
macro_rules! counters {
    (
        $(#[$meta:meta])*
        pub struct $name:ident {
            $( $field:ident => ($column:literal, $help:literal), )*
        }
    ) => {
        $(#[$meta])*
        #[repr(C)]
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
        #[cfg_attr(feature = "user", derive(serde::Serialize, serde::Deserialize))]
        pub struct $name {
            $( #[doc = $help] pub $field: u64, )*
        }

        impl $name {
            /// How many counters.
            pub const COUNT: usize = Self::COUNTERS.len();
            /// Their descriptions, in field order.
            pub const COUNTERS: &'static [$crate::Counter] = &[
                $( $crate::Counter { name: stringify!($field), column: $column, help: $help }, )*
            ];

            /// Sums per-CPU values.
            pub fn add(&mut self, other: &Self) {
                $( self.$field += other.$field; )*
            }

            /// The values, in the order of [`Self::COUNTERS`].
            pub fn values(&self) -> [u64; Self::COUNT] {
                [$( self.$field, )*]
            }

            /// The values, writable, in the order of [`Self::COUNTERS`].
            pub fn values_mut(&mut self) -> &mut [u64; Self::COUNT] {
                bytemuck::cast_mut(self)
            }
        }
    };
    (
        $(#[$meta:meta])*
        pub struct $name:ident, index enum $index:ident {
            $( $field:ident / $variant:ident => ($column:literal, $help:literal), )*
        }
    ) => {
        counters! {
            $(#[$meta])*
            pub struct $name {
                $( $field => ($column, $help), )*
            }
        }

        /// One counter of the struct by position (its discriminant is the field's index).
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        #[repr(u8)]
        pub enum $index {
            $( #[doc = $help] $variant, )*
        }

        impl $index {
            /// Every counter, in field order.
            pub const ALL: [Self; $name::COUNT] = [$( Self::$variant, )*];

            /// Adds one to this counter of `counters`.
            ///
            /// The index is bounded by a comparison the verifier can see. Without it, LLVM
            /// (which knows the enum's range) compiles the access to an unchecked offset, and
            /// Linux 6.1's verifier refuses that when the value went through the stack, as
            /// it does when it comes back from a bpf_loop callback.
            #[inline(always)]
            pub fn increment(self, counters: &mut $name) {
                let code = self as u8;
                // SAFETY: a read of a local; volatile so that LLVM cannot drop the bound.
                let index = unsafe { core::ptr::read_volatile(&code) } as usize;
                if index < $name::COUNT {
                    counters.values_mut()[index] += 1;
                }
            }
        }
    };
}
