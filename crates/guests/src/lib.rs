//! The built-in guest programs (from `guest/programs`), embedded as ELF images.
//!
//! The build script compiles the guest workspace; this crate only looks programs up.

include!(concat!(env!("OUT_DIR"), "/programs.rs"));

/// A built-in guest program.
#[derive(Clone, Copy, Debug)]
pub struct Program {
    /// Name used on the command line (`--guest NAME`).
    pub name: &'static str,
    /// One-line description.
    pub description: &'static str,
    /// The ELF image.
    pub elf: &'static [u8],
}

/// All built-in programs, in a stable order.
pub fn all() -> impl Iterator<Item = Program> {
    PROGRAMS.iter().map(|&(name, description, elf)| Program { name, description, elf })
}

/// The built-in program called `name`.
pub fn get(name: &str) -> Option<Program> {
    all().find(|p| p.name == name)
}

/// A guest program's image: the built-in program called `name`, else the file at that
/// path; an error names the built-in ones.
pub fn load(name: &str) -> Result<Vec<u8>, String> {
    if let Some(p) = get(name) {
        return Ok(p.elf.to_vec());
    }
    let path = std::path::Path::new(name);
    if path.exists() {
        return std::fs::read(path).map_err(|e| format!("cannot read guest program {}: {e}", path.display()));
    }
    let names: Vec<&str> = all().map(|p| p.name).collect();
    Err(format!("unknown guest '{name}': it is neither a built-in program ({}) nor an existing file", names.join(", ")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_program_is_a_static_x86_64_elf_linked_at_the_image_address() {
        assert!(all().count() >= 4);
        for p in all() {
            assert_eq!(&p.elf[..4], b"\x7fELF", "{} is not an ELF", p.name);
            assert_eq!(p.elf[4], 2, "{} is not 64-bit", p.name);
            assert_eq!(u16::from_le_bytes([p.elf[18], p.elf[19]]), 62, "{} is not x86-64", p.name);
            let entry = u64::from_le_bytes(p.elf[24..32].try_into().expect("8 bytes"));
            assert!(entry >= abi::layout::IMAGE_ADDR, "{} entry {entry:#x} below the image address", p.name);
        }
        assert!(get("hello").is_some() && get("interrupts").is_some() && get("nope").is_none());
    }
}
