//! The shared AWS files (`~/.aws/credentials` and `~/.aws/config`), read the way the AWS CLI
//! reads them for static keys, region and endpoint: object_store itself only reads the
//! environment.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// What one profile of the shared files says.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Profile {
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    pub session_token: Option<String>,
    pub region: Option<String>,
    pub endpoint_url: Option<String>,
}

impl Profile {
    /// The profile named by `AWS_PROFILE` (or `default`) from the files named by
    /// `AWS_SHARED_CREDENTIALS_FILE` and `AWS_CONFIG_FILE` (or their places under `~/.aws`).
    /// `None` when there is nothing to read; an error when `AWS_PROFILE` names a profile that
    /// neither file has.
    pub fn load() -> Result<Option<Self>, String> {
        let home = std::env::var_os("HOME").map(PathBuf::from);
        let file = |var: &str, default: &str| {
            std::env::var_os(var)
                .map(PathBuf::from)
                .or_else(|| home.as_ref().map(|h| h.join(".aws").join(default)))
        };
        let explicit = std::env::var("AWS_PROFILE").ok().filter(|p| !p.is_empty());
        let name = explicit.clone().unwrap_or_else(|| "default".to_string());
        let credentials = file("AWS_SHARED_CREDENTIALS_FILE", "credentials");
        let config = file("AWS_CONFIG_FILE", "config");
        let found = Self::from_files(&name, credentials.as_deref(), config.as_deref())?;
        if found.is_none()
            && let Some(name) = explicit
        {
            return Err(format!(
                "AWS_PROFILE={name}, but neither {} nor {} has that profile",
                credentials.map(|p| p.display().to_string()).unwrap_or_default(),
                config.map(|p| p.display().to_string()).unwrap_or_default(),
            ));
        }
        Ok(found)
    }

    fn from_files(
        name: &str,
        credentials: Option<&Path>,
        config: Option<&Path>,
    ) -> Result<Option<Self>, String> {
        let read = |path: Option<&Path>| -> Result<Option<String>, String> {
            match path {
                Some(p) if p.is_file() => std::fs::read_to_string(p)
                    .map(Some)
                    .map_err(|e| format!("cannot read {}: {e}", p.display())),
                _ => Ok(None),
            }
        };
        // The credentials file names sections `[name]`; the config file `[profile name]`,
        // except for `[default]`.
        let from_credentials = read(credentials)?.and_then(|text| section(&text, name));
        let config_section = if name == "default" {
            "default".to_string()
        } else {
            format!("profile {name}")
        };
        let from_config = read(config)?.and_then(|text| section(&text, &config_section));
        if from_credentials.is_none() && from_config.is_none() {
            return Ok(None);
        }
        let mut merged = from_config.unwrap_or_default();
        merged.extend(from_credentials.unwrap_or_default());
        let take = |key: &str| merged.get(key).cloned().filter(|v| !v.is_empty());
        Ok(Some(Self {
            access_key_id: take("aws_access_key_id"),
            secret_access_key: take("aws_secret_access_key"),
            session_token: take("aws_session_token"),
            region: take("region"),
            endpoint_url: take("endpoint_url"),
        }))
    }
}

/// The `key = value` pairs of section `[name]` of an INI text, if it has one.
fn section(text: &str, name: &str) -> Option<HashMap<String, String>> {
    let mut current: Option<bool> = None;
    let mut found = None::<HashMap<String, String>>;
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(header) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            let this = header.trim() == name;
            if this {
                found.get_or_insert_with(HashMap::new);
            }
            current = Some(this);
            continue;
        }
        if current == Some(true)
            && let Some((key, value)) = line.split_once('=')
            && let Some(map) = found.as_mut()
        {
            map.insert(key.trim().to_ascii_lowercase(), value.trim().to_string());
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profiles_merge_config_and_credentials_with_credentials_winning() {
        let dir = tempfile::tempdir().unwrap();
        let creds = dir.path().join("credentials");
        let config = dir.path().join("config");
        std::fs::write(
            &creds,
            "[default]\naws_access_key_id = AKIDDEFAULT\naws_secret_access_key = s1\n\n\
             [train]\n# a comment\naws_access_key_id=AKIDTRAIN\naws_secret_access_key = s2\n",
        )
        .unwrap();
        std::fs::write(
            &config,
            "[default]\nregion = eu-west-1\n[profile train]\nregion = us-east-2\n\
             endpoint_url = http://127.0.0.1:9000\naws_access_key_id = FROMCONFIG\n",
        )
        .unwrap();
        let train = Profile::from_files("train", Some(&creds), Some(&config))
            .unwrap()
            .unwrap();
        assert_eq!(
            train,
            Profile {
                access_key_id: Some("AKIDTRAIN".into()),
                secret_access_key: Some("s2".into()),
                session_token: None,
                region: Some("us-east-2".into()),
                endpoint_url: Some("http://127.0.0.1:9000".into()),
            }
        );
        let default = Profile::from_files("default", Some(&creds), Some(&config))
            .unwrap()
            .unwrap();
        assert_eq!(default.access_key_id.as_deref(), Some("AKIDDEFAULT"));
        assert_eq!(default.region.as_deref(), Some("eu-west-1"));
        assert_eq!(
            Profile::from_files("nope", Some(&creds), Some(&config)).unwrap(),
            None
        );
        assert_eq!(Profile::from_files("default", None, None).unwrap(), None);
    }
}
