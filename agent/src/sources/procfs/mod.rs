//! Process identity (SPEC §1.4).
