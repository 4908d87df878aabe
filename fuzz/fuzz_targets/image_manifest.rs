//! OCI manifests, indexes and image configs as a registry or an archive serves them (the first
//! byte picks the media type the blob claims, or a config).
#![no_main]

use oci_spec::image::ImageConfiguration;
use switchyard_images::oci::{self, Parsed};
use switchyard_images::{Platform, RunConfig};

const MEDIA_TYPES: [&str; 5] = [
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/octet-stream",
];

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Some((&which, blob)) = data.split_first() else {
        return;
    };
    let digest = "sha256:0000000000000000000000000000000000000000000000000000000000000000";
    let platform = Platform::host();
    if usize::from(which) % 6 == 5 {
        if let Ok(config) = ImageConfiguration::from_reader(blob) {
            let _ = RunConfig::from_image(&config);
            let _ = oci::check_config_platform(digest, &config, &platform);
        }
        return;
    }
    match oci::parse_manifest(digest, MEDIA_TYPES[usize::from(which) % 6], blob) {
        Ok(Parsed::Index(index)) => {
            let _ = oci::select_platform(digest, &index, &platform);
        }
        Ok(Parsed::Manifest(manifest)) => {
            let _ = oci::is_wasm_artifact(&manifest);
            let _ = oci::diff_ids(&manifest, None);
            for layer in manifest.layers() {
                let _ = oci::wasm_module_name(layer);
            }
        }
        Err(_) => {}
    }
});
