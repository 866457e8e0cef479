//! Who may call what: bearer tokens read from a file, each with a name and the job-id prefixes it
//! may use.
//!
//! The interceptor here only answers "who is calling": it turns the `authorization` header into
//! an [`Access`] in the request's extensions, or UNAUTHENTICATED. Which jobs that caller may
//! touch is decided in one place in `api`, where the job id of each request (and of each
//! message of a stream) is known.
//!
//! The tokens file (TOML, documented in the README):
//!
//! ```toml
//! [[token]]
//! name = "team-a"                       # shown in logs instead of the token
//! token = "a-long-random-secret-string" # at least 16 characters
//! prefixes = ["team-a/"]                # job ids this token may use; "" means every job
//! # Optional quotas; without them the server's --caller-* defaults apply.
//! max_jobs = 500                        # jobs this token's caller may hold
//! max_jobs_bytes = 268435456            # bytes those jobs may hold (README, Limits)
//! max_concurrent_requests = 256         # its share of --max-concurrent-requests
//! ```

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use parking_lot::RwLock;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::{ConditionallySelectable, ConstantTimeEq};
use tonic::service::Interceptor;
use tonic::{Request, Status};

use crate::jobs::MAX_JOB_ID_LEN;
use crate::shutdown::Shutdown;

/// Shorter secrets can be guessed; `openssl rand -hex 16` gives 32 characters.
pub const MIN_TOKEN_LEN: usize = 16;

/// What a request may do, put into its extensions by [`AuthInterceptor`].
#[derive(Clone, Debug)]
pub enum Access {
    /// The server runs without a tokens file: every job is open to everyone.
    Open,
    /// A caller that presented a known token.
    Caller(Arc<Caller>),
}

/// The identity behind a token. It never holds the token itself, so it can be logged.
#[derive(Debug)]
pub struct Caller {
    pub name: String,
    pub prefixes: Vec<String>,
    /// Set when a reload removes or changes this caller's token, so that the streams it opened
    /// see it at their next message (one atomic load) instead of keeping the old rights.
    revoked: AtomicBool,
    /// The token's own quotas; `None`: the server's `--caller-*` defaults.
    pub max_jobs: Option<usize>,
    pub max_jobs_bytes: Option<usize>,
    pub max_concurrent_requests: Option<usize>,
}

impl PartialEq for Caller {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name && self.prefixes == other.prefixes
    }
}

impl Eq for Caller {}

impl Access {
    /// Whether this caller may use the job `job_id` (create, read, weigh, change or delete it).
    pub fn may_use(&self, job_id: &str) -> bool {
        match self {
            Access::Open => true,
            Access::Caller(caller) => caller.may_use(job_id),
        }
    }

    /// UNAUTHENTICATED once a reload of the tokens file removed or changed this caller's
    /// token; a stream checks it before each message.
    pub fn check_not_revoked(&self) -> Result<(), Status> {
        match self {
            Access::Caller(caller) if caller.revoked.load(Ordering::Acquire) => {
                Err(Status::unauthenticated(format!(
                    "the token {:?} was removed or changed by a reload of the tokens file; \
                     open a new stream with a current token",
                    caller.name
                )))
            }
            _ => Ok(()),
        }
    }

    /// The caller's name for logs; "anonymous" on an open server.
    pub fn name(&self) -> &str {
        match self {
            Access::Open => "anonymous",
            Access::Caller(caller) => &caller.name,
        }
    }
}

impl Caller {
    pub fn may_use(&self, job_id: &str) -> bool {
        self.prefixes
            .iter()
            .any(|prefix| job_id.starts_with(prefix.as_str()))
    }
}

/// Why a tokens file was refused. Messages name the file and the entry, never a token.
#[derive(Debug, thiserror::Error)]
pub enum TokensError {
    #[error("tokens file {path}: cannot read it: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("tokens file {path}, line {line}: {message}")]
    Syntax {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("tokens file {path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokensFile {
    #[serde(default)]
    token: Vec<TokenEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenEntry {
    name: String,
    token: String,
    prefixes: Vec<String>,
    #[serde(default)]
    max_jobs: Option<usize>,
    #[serde(default)]
    max_jobs_bytes: Option<usize>,
    #[serde(default)]
    max_concurrent_requests: Option<usize>,
}

/// A token is kept only as its SHA-256, so that every comparison is over 32 bytes whatever the
/// length presented, and a memory dump does not show it.
struct KnownToken {
    digest: [u8; 32],
    caller: Arc<Caller>,
}

/// The tokens of one version of the file.
pub struct TokenSet {
    tokens: Vec<KnownToken>,
}

impl TokenSet {
    /// Parses and checks a tokens file's text; `path` only names it in errors.
    pub fn parse(path: &Path, text: &str) -> Result<Self, TokensError> {
        let invalid = |message: String| TokensError::Invalid {
            path: path.to_owned(),
            message,
        };
        // toml's own Display quotes the offending line, which may hold a token: report the line
        // number and the message only.
        let file: TokensFile = toml::from_str(text).map_err(|error| TokensError::Syntax {
            path: path.to_owned(),
            line: error.span().map_or(0, |span| {
                text[..span.start.min(text.len())].lines().count().max(1)
            }),
            message: error.message().to_owned(),
        })?;
        if file.token.is_empty() {
            return Err(invalid(
                "no [[token]] entries: every request would be refused; remove --tokens-file to \
                 run open instead"
                    .to_owned(),
            ));
        }
        let mut tokens: Vec<KnownToken> = Vec::with_capacity(file.token.len());
        for (index, entry) in file.token.into_iter().enumerate() {
            let what = format!("token[{index}] (name {:?})", entry.name);
            if entry.name.is_empty()
                || entry.name.len() > 64
                || entry.name.chars().any(char::is_control)
            {
                return Err(invalid(format!(
                    "token[{index}].name must be 1 to 64 printable characters"
                )));
            }
            if entry.token.len() < MIN_TOKEN_LEN {
                return Err(invalid(format!(
                    "{what}: the token is shorter than {MIN_TOKEN_LEN} characters"
                )));
            }
            if !entry.token.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(invalid(format!(
                    "{what}: the token may only hold visible ASCII characters (no spaces), as an \
                     HTTP header value must"
                )));
            }
            if entry.prefixes.is_empty() {
                return Err(invalid(format!(
                    "{what}: prefixes is empty, so the token could use no job; use [\"\"] for \
                     every job"
                )));
            }
            for prefix in &entry.prefixes {
                if prefix.len() > MAX_JOB_ID_LEN
                    || !prefix.bytes().all(|b| {
                        b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'/' | b'-')
                    })
                {
                    return Err(invalid(format!(
                        "{what}: prefix {prefix:?} is not the start of any valid job id \
                         ([A-Za-z0-9._/-], at most {MAX_JOB_ID_LEN} characters)"
                    )));
                }
            }
            let digest: [u8; 32] = Sha256::digest(entry.token.as_bytes()).into();
            if let Some(same) = tokens.iter().find(|known| known.digest == digest) {
                return Err(invalid(format!(
                    "{what}: the same token as {:?}; give every client its own",
                    same.caller.name
                )));
            }
            if tokens.iter().any(|known| known.caller.name == entry.name) {
                return Err(invalid(format!("{what}: the name is used twice")));
            }
            tokens.push(KnownToken {
                digest,
                caller: Arc::new(Caller {
                    name: entry.name,
                    prefixes: entry.prefixes,
                    revoked: AtomicBool::new(false),
                    max_jobs: entry.max_jobs,
                    max_jobs_bytes: entry.max_jobs_bytes,
                    max_concurrent_requests: entry.max_concurrent_requests,
                }),
            });
        }
        Ok(Self { tokens })
    }

    pub fn load(path: &Path) -> Result<Self, TokensError> {
        let text = std::fs::read_to_string(path).map_err(|source| TokensError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(path, &text)
    }

    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// Takes over the callers of `old` whose token, name and prefixes are unchanged (so that
    /// their open streams go on), and marks every other caller of `old` revoked.
    fn succeed(&mut self, old: &TokenSet) {
        for known in &old.tokens {
            match self
                .tokens
                .iter_mut()
                .find(|new| new.digest == known.digest && *new.caller == *known.caller)
            {
                Some(same) => same.caller = Arc::clone(&known.caller),
                None => known.caller.revoked.store(true, Ordering::Release),
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// The caller a presented token belongs to. Every known token is compared, in constant
    /// time and without an early exit, so that the time taken tells nothing of which token
    /// (or how much of one) matched.
    pub fn identify(&self, presented: &[u8]) -> Option<Arc<Caller>> {
        let digest: [u8; 32] = Sha256::digest(presented).into();
        let mut found = subtle::Choice::from(0);
        let mut index = 0u64;
        for (i, known) in self.tokens.iter().enumerate() {
            let equal = known.digest.ct_eq(&digest);
            index = u64::conditional_select(&index, &(i as u64), equal);
            found |= equal;
        }
        if bool::from(found) {
            usize::try_from(index)
                .ok()
                .and_then(|index| self.tokens.get(index))
                .map(|known| Arc::clone(&known.caller))
        } else {
            None
        }
    }
}

/// The server's tokens: none (open) or the current version of the file, replaced as a whole
/// on reload so that a request sees either the old set or the new one.
pub struct Authenticator {
    path: Option<PathBuf>,
    tokens: RwLock<Arc<TokenSet>>,
}

impl Authenticator {
    /// A server without a tokens file: every request is let in.
    pub fn open() -> Self {
        Self {
            path: None,
            tokens: RwLock::new(Arc::new(TokenSet { tokens: Vec::new() })),
        }
    }

    /// Reads the tokens file; a server refuses to start on a bad one rather than run open.
    pub fn from_file(path: &Path) -> Result<Self, TokensError> {
        let tokens = TokenSet::load(path)?;
        warn_if_readable_by_others(path);
        Ok(Self {
            path: Some(path.to_owned()),
            tokens: RwLock::new(Arc::new(tokens)),
        })
    }

    pub fn is_open(&self) -> bool {
        self.path.is_none()
    }

    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Reads the tokens file again (SIGHUP). On any error the old tokens stay in force, so a
    /// half-written file cannot lock every client out or let everyone in. Returns the number
    /// of tokens now in force; `Ok(None)` on an open server, which has no file to reload.
    pub fn reload(&self) -> Result<Option<usize>, TokensError> {
        let Some(path) = &self.path else {
            return Ok(None);
        };
        let mut tokens = TokenSet::load(path)?;
        warn_if_readable_by_others(path);
        let count = tokens.len();
        let mut current = self.tokens.write();
        tokens.succeed(&current);
        *current = Arc::new(tokens);
        Ok(Some(count))
    }

    /// Rereads the tokens file on every SIGHUP until `shutdown`. A bad file keeps the tokens in
    /// force and says why.
    pub fn spawn_reload_on_sighup(
        self: &Arc<Self>,
        mut shutdown: Shutdown,
    ) -> tokio::task::JoinHandle<()> {
        let authenticator = Arc::clone(self);
        tokio::spawn(async move {
            #[cfg(unix)]
            {
                use tokio::signal::unix::{SignalKind, signal};
                let mut hangup = match signal(SignalKind::hangup()) {
                    Ok(signal) => signal,
                    Err(error) => {
                        tracing::warn!(
                            %error,
                            "cannot listen for SIGHUP; tokens reload needs a restart"
                        );
                        return;
                    }
                };
                loop {
                    tokio::select! {
                        received = hangup.recv() => {
                            if received.is_none() {
                                return;
                            }
                            authenticator.log_reload();
                        }
                        () = shutdown.recv() => return,
                    }
                }
            }
            #[cfg(not(unix))]
            {
                let _ = authenticator;
                shutdown.recv().await;
            }
        })
    }

    #[cfg(unix)]
    fn log_reload(&self) {
        match self.reload() {
            Ok(Some(count)) => tracing::info!(tokens = count, "SIGHUP: tokens file reloaded"),
            Ok(None) => tracing::info!("SIGHUP: no --tokens-file to reload"),
            Err(error) => {
                tracing::error!("SIGHUP: {error}; the tokens loaded before stay in force")
            }
        }
    }

    /// The access of a request with these headers, or UNAUTHENTICATED.
    pub fn authenticate(&self, metadata: &tonic::metadata::MetadataMap) -> Result<Access, Status> {
        if self.is_open() {
            return Ok(Access::Open);
        }
        let Some(value) = metadata.get("authorization") else {
            return Err(Status::unauthenticated(
                "no authorization header: send `authorization: Bearer <token>`",
            ));
        };
        let presented = value
            .as_bytes()
            .split_first_chunk::<7>()
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case(b"bearer "))
            .map(|(_, token)| token.trim_ascii())
            .ok_or_else(|| {
                Status::unauthenticated(
                    "the authorization header is not of the form `Bearer <token>`",
                )
            })?;
        let tokens = Arc::clone(&self.tokens.read());
        match tokens.identify(presented) {
            Some(caller) => Ok(Access::Caller(caller)),
            None => Err(Status::unauthenticated(
                "unknown token: it is not in the server's tokens file",
            )),
        }
    }
}

#[cfg(unix)]
fn warn_if_readable_by_others(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(metadata) = std::fs::metadata(path)
        && metadata.permissions().mode() & 0o077 != 0
    {
        tracing::warn!(
            path = %path.display(),
            "the tokens file is readable by other users; chmod 600 it"
        );
    }
}

#[cfg(not(unix))]
fn warn_if_readable_by_others(_path: &Path) {}

/// Puts the caller's [`Access`] into every request of the services it wraps, or refuses the
/// request with UNAUTHENTICATED before any of it is decoded.
#[derive(Clone)]
pub struct AuthInterceptor {
    authenticator: Arc<Authenticator>,
}

impl AuthInterceptor {
    pub fn new(authenticator: Arc<Authenticator>) -> Self {
        Self { authenticator }
    }
}

impl Interceptor for AuthInterceptor {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        match self.authenticator.authenticate(request.metadata()) {
            Ok(access) => {
                request.extensions_mut().insert(access);
                Ok(request)
            }
            Err(status) => {
                tracing::debug!(
                    peer = ?request.remote_addr(),
                    reason = status.message(),
                    "request refused: not authenticated"
                );
                Err(status)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[[token]]
name = "team-a"
token = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
prefixes = ["team-a/"]

[[token]]
name = "admin"
token = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb"
prefixes = [""]
"#;

    fn parse(text: &str) -> Result<TokenSet, TokensError> {
        TokenSet::parse(Path::new("tokens.toml"), text)
    }

    #[test]
    fn a_known_token_is_its_caller_and_nothing_else_is_anyone() {
        let set = parse(GOOD).unwrap();
        let a = set.identify(b"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa").unwrap();
        assert_eq!(a.name, "team-a");
        assert!(a.may_use("team-a/run-1"));
        assert!(!a.may_use("team-b/run-1"));
        assert!(!a.may_use("team-a"));
        let admin = set.identify(b"bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb").unwrap();
        assert_eq!(admin.name, "admin");
        assert!(admin.may_use("anything"));
        for wrong in [
            &b""[..],
            b"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
            b"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
            b"Aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
        ] {
            assert!(set.identify(wrong).is_none(), "{wrong:?}");
        }
    }

    #[test]
    fn bad_files_are_refused_without_quoting_a_token() {
        let secret = "s3cr3t-s3cr3t-s3cr3t-s3cr3t";
        let cases = [
            (String::new(), "no [[token]]"),
            (
                format!("[[token]]\nname = \"x\"\ntoken = \"{secret}\"\n"),
                "prefixes",
            ),
            (
                format!("[[token]]\nname = \"x\"\ntoken = \"{secret}\"\nprefix = [\"a\"]\n"),
                "prefix",
            ),
            (
                "[[token]]\nname = \"x\"\ntoken = \"short\"\nprefixes = [\"a/\"]\n".to_owned(),
                "shorter than 16",
            ),
            (
                format!("[[token]]\nname = \"x\"\ntoken = \"{secret}\"\nprefixes = []\n"),
                "prefixes is empty",
            ),
            (
                format!("[[token]]\nname = \"x\"\ntoken = \"{secret}\"\nprefixes = [\"a b\"]\n"),
                "not the start of any valid job id",
            ),
            (
                format!(
                    "[[token]]\nname = \"x\"\ntoken = \"{secret}\"\nprefixes = [\"a\"]\n\
                     [[token]]\nname = \"y\"\ntoken = \"{secret}\"\nprefixes = [\"b\"]\n"
                ),
                "the same token as \"x\"",
            ),
            (
                format!(
                    "[[token]]\nname = \"x\"\ntoken = \"{secret}\"\nprefixes = [\"a\"]\n\
                     [[token]]\nname = \"x\"\ntoken = \"{secret}-2\"\nprefixes = [\"b\"]\n"
                ),
                "name is used twice",
            ),
            (
                format!(
                    "[[token]]\nname = \"x\"\ntoken = \"{secret} with space\"\nprefixes = [\"a\"]\n"
                ),
                "visible ASCII",
            ),
            (
                format!("[[token]]\nname = \"x\"\ntoken = \"{secret}\nprefixes = [\"a\"]\n"),
                "line 3",
            ),
        ];
        for (text, needle) in cases {
            let error = parse(&text)
                .err()
                .unwrap_or_else(|| panic!("accepted:\n{text}"));
            let message = error.to_string();
            assert!(message.contains(needle), "{message:?} lacks {needle:?}");
            assert!(!message.contains("s3cr3t"), "{message:?} quotes the token");
        }
    }

    #[test]
    fn the_header_must_be_a_bearer_token() {
        let dir = std::env::temp_dir().join(format!("ghmd-auth-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("tokens.toml");
        std::fs::write(&path, GOOD).unwrap();
        let auth = Authenticator::from_file(&path).unwrap();
        let with = |value: &str| {
            let mut metadata = tonic::metadata::MetadataMap::new();
            metadata.insert("authorization", value.parse().unwrap());
            auth.authenticate(&metadata)
        };
        let ok = with("Bearer aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa").unwrap();
        assert_eq!(ok.name(), "team-a");
        assert_eq!(
            with("bearer   bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb ")
                .unwrap()
                .name(),
            "admin"
        );
        for bad in [
            "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
            "Basic aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
            "Bearer",
            "Bearer zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz",
        ] {
            let status = with(bad).unwrap_err();
            assert_eq!(status.code(), tonic::Code::Unauthenticated, "{bad}");
        }
        let status = auth
            .authenticate(&tonic::metadata::MetadataMap::new())
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unauthenticated);

        // A bad rewrite keeps the old tokens; a good one replaces them.
        std::fs::write(&path, "[[token]]\nname = 1\n").unwrap();
        assert!(auth.reload().is_err());
        assert!(with("Bearer aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa").is_ok());
        std::fs::write(
            &path,
            "[[token]]\nname = \"c\"\ntoken = \"cccccccccccccccccccc\"\nprefixes = [\"c/\"]\n",
        )
        .unwrap();
        assert_eq!(auth.reload().unwrap(), Some(1));
        assert!(
            ok.check_not_revoked().is_err(),
            "a removed token's access is revoked"
        );
        assert!(with("Bearer aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa").is_err());
        let kept = with("Bearer cccccccccccccccccccc").unwrap();
        assert_eq!(kept.name(), "c");
        // Rereading the same file keeps the access of its callers.
        assert_eq!(auth.reload().unwrap(), Some(1));
        assert!(kept.check_not_revoked().is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
