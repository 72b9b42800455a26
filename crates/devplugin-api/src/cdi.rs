//! Container Device Interface specs: rendered for a set of devices and kept
//! in step on disk.
