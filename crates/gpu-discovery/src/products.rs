//! Product names of known device ids, shared by the labeller's
//! `gpu.intel.com/product` label and the DRA driver's `model` and
//! `family` attributes.

/// A known product.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Product {
    /// PCI device id.
    pub device_id: u16,
    /// The model, as people write it (`Flex 170`).
    pub model: &'static str,
    /// The family (`Flex Series`).
    pub family: &'static str,
}

impl Product {
    /// The model as a label value (`Flex_170`).
    #[must_use]
    pub fn model_label(&self) -> String {
        self.model.replace(' ', "_")
    }

    /// The family as a label value (`Flex_Series`).
    #[must_use]
    pub fn family_label(&self) -> String {
        self.family.replace(' ', "_")
    }
}

const PRODUCTS: &[Product] = &[
    p(0x0bd5, "Max 1550", "Max Series"),
    p(0x0bda, "Max 1100", "Max Series"),
    p(0x56c0, "Flex 170", "Flex Series"),
    p(0x56c1, "Flex 140", "Flex Series"),
    p(0x56a0, "A770", "A Series"),
    p(0x56a5, "A380", "A Series"),
    p(0xe20b, "B580", "B Series"),
    p(0xe20c, "B570", "B Series"),
];

const fn p(device_id: u16, model: &'static str, family: &'static str) -> Product {
    Product {
        device_id,
        model,
        family,
    }
}

/// The product of a device id, when known.
#[must_use]
pub fn product(device_id: u16) -> Option<&'static Product> {
    PRODUCTS.iter().find(|p| p.device_id == device_id)
}
