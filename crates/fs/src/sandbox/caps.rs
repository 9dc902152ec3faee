//! The capabilities a root daemon keeps (virtiofsd's set), `--modcaps`, and dropping the rest.

use ::caps::{CapSet, Capability, CapsHashSet};

use super::Error;

/// What the passthrough uses as root: chown and the ownership checks it overrides on the
/// guest's behalf (CHOWN, DAC_OVERRIDE, FOWNER, FSETID), per-request fsuid/fsgid and groups
/// (SETUID, SETGID), MKNOD, `security.capability` xattrs (SETFCAP), and file handles for
/// directories (DAC_READ_SEARCH, `open_by_handle_at`).
const DEFAULT: [Capability; 9] = [
    Capability::CAP_CHOWN,
    Capability::CAP_DAC_OVERRIDE,
    Capability::CAP_FOWNER,
    Capability::CAP_FSETID,
    Capability::CAP_SETGID,
    Capability::CAP_SETUID,
    Capability::CAP_MKNOD,
    Capability::CAP_SETFCAP,
    Capability::CAP_DAC_READ_SEARCH,
];

/// The set a root daemon serves with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Kept(CapsHashSet);

/// `chown`, `CHOWN` and `cap_chown` all name CAP_CHOWN.
fn parse_name(name: &str) -> Result<Capability, Error> {
    let upper = name.to_ascii_uppercase();
    let full = if upper.starts_with("CAP_") {
        upper
    } else {
        format!("CAP_{upper}")
    };
    full.parse()
        .map_err(|_| Error::Modcaps(format!("unknown capability {name:?}")))
}

impl Kept {
    /// The default set changed by `modcaps`: colon-separated `+name` (keep as well) and
    /// `-name` (drop), as virtiofsd's `--modcaps`.
    pub(super) fn parse(modcaps: Option<&str>) -> Result<Self, Error> {
        let mut set: CapsHashSet = DEFAULT.into_iter().collect();
        for item in modcaps.into_iter().flat_map(|m| m.split(':')) {
            let (add, name) = match item.split_at_checked(1) {
                Some(("+", n)) if !n.is_empty() => (true, n),
                Some(("-", n)) if !n.is_empty() => (false, n),
                _ => {
                    return Err(Error::Modcaps(format!(
                        "{item:?} is not +name or -name (e.g. --modcaps=-mknod:+sys_resource)"
                    )))
                }
            };
            let cap = parse_name(name)?;
            if add {
                set.insert(cap);
            } else {
                set.remove(&cap);
            }
        }
        Ok(Kept(set))
    }

    /// Only the capabilities this process has: a kept one it lacks (a container may withhold
    /// some) cannot be raised, and is reported once.
    fn available(&self, extra: &[Capability]) -> Result<CapsHashSet, Error> {
        let permitted = ::caps::read(None, CapSet::Permitted)?;
        let want: CapsHashSet = self.0.iter().chain(extra).copied().collect();
        Ok(want.intersection(&permitted).copied().collect())
    }

    /// Lowers the effective set to the kept one plus `setup` (what entering the sandbox still
    /// needs), so that what the passthrough probes while it opens the share is what it will
    /// have later. Permitted stays, so nothing is lost yet.
    pub(super) fn lower_effective(&self, setup: &[Capability]) -> Result<(), Error> {
        let set = self.available(setup)?;
        ::caps::set(None, CapSet::Effective, &set)?;
        Ok(())
    }

    /// Drops every capability but the kept ones from this thread: bounding, ambient and
    /// inheritable emptied, permitted and effective the kept set. Threads started afterwards
    /// inherit the result.
    pub(super) fn apply(&self) -> Result<(), Error> {
        let set = self.available(&[])?;
        let missing: Vec<_> = self.0.difference(&set).map(|c| c.to_string()).collect();
        if !missing.is_empty() {
            tracing::warn!(
                missing = missing.join(","),
                "capabilities to keep that this process does not have"
            );
        }
        // Dropping from the bounding set needs CAP_SETPCAP, so it comes first.
        ::caps::clear(None, CapSet::Bounding)?;
        ::caps::clear(None, CapSet::Ambient)?;
        ::caps::clear(None, CapSet::Inheritable)?;
        // Effective must stay a subset of permitted at every step.
        ::caps::set(None, CapSet::Effective, &set)?;
        ::caps::set(None, CapSet::Permitted, &set)?;
        tracing::debug!(caps = ?set, "capabilities kept");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kept(m: &str) -> CapsHashSet {
        Kept::parse(Some(m)).unwrap().0
    }

    #[test]
    fn default_is_virtiofsds_set_with_file_handles() {
        let d = Kept::parse(None).unwrap().0;
        assert_eq!(d.len(), 9);
        assert!(d.contains(&Capability::CAP_DAC_READ_SEARCH));
        assert!(!d.contains(&Capability::CAP_SYS_ADMIN));
    }

    #[test]
    fn modcaps_adds_and_removes_in_any_spelling() {
        let s = kept("+sys_resource:-MKNOD:-cap_dac_read_search");
        assert!(s.contains(&Capability::CAP_SYS_RESOURCE));
        assert!(!s.contains(&Capability::CAP_MKNOD));
        assert!(!s.contains(&Capability::CAP_DAC_READ_SEARCH));
        assert_eq!(s.len(), 8);
        // Later items win.
        assert!(kept("-chown:+chown").contains(&Capability::CAP_CHOWN));
    }

    #[test]
    fn modcaps_rejects_malformed_items() {
        for bad in [
            "",
            "chown",
            "+",
            "-",
            "+chown:",
            "*chown",
            "+no_such_cap",
            "+sys admin",
        ] {
            assert!(
                matches!(Kept::parse(Some(bad)), Err(Error::Modcaps(_))),
                "{bad:?} accepted"
            );
        }
    }
}
