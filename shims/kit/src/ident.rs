//! containerd's identifier rule (one home: `switchyard_base::ident`) for task and exec ids that
//! end up in paths, as the kit's InvalidArgument.

use crate::error::{Error, Result};

/// Checks `id` as the identifier called `field` in errors.
pub fn check(field: &'static str, id: &str) -> Result<()> {
    switchyard_base::ident::check(field, id).map_err(|e| Error::InvalidArgument(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::check;

    #[test]
    fn ids_are_invalid_arguments_naming_the_field() {
        check("id", "abc.def_g-h").unwrap();
        let e = check("exec_id", "../x").unwrap_err();
        assert_eq!(
            e.code(),
            containerd_shim_protos::ttrpc::Code::INVALID_ARGUMENT
        );
        assert!(e.to_string().starts_with("invalid exec_id \"../x\""), "{e}");
    }
}
