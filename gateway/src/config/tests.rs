#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::*;

const TEST_HASH_KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

struct Files {
    dir: tempfile::TempDir,
}

impl Files {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("cert.pem"), "x").unwrap();
        std::fs::write(dir.path().join("key.pem"), "x").unwrap();
        Self { dir }
    }

    /// A minimal valid configuration, plus `extra` TOML appended.
    fn toml(&self, extra: &str) -> String {
        let d = self.dir.path().display();
        format!(
            "[tls]\ncert = \"{d}/cert.pem\"\nkey = \"{d}/key.pem\"\n\
             [database]\nurl = \"sqlite://{d}/db.sqlite\"\n\
             [keys]\nsource = \"file\"\nfile_dir = \"{d}\"\n{extra}"
        )
    }

    fn load(&self, text: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let path = self.dir.path().join("portcullis.toml");
        std::fs::write(&path, text).unwrap();
        // every test file needs the keyed-hash key; it comes from the environment so that
        // tests may still write their own [tokens] section
        let key = ("PORTCULLIS_TOKENS__HASH_KEY", TEST_HASH_KEY);
        load(
            &path,
            env.iter()
                .chain(std::iter::once(&key))
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
        )
    }
}

fn field_of(err: ConfigError) -> String {
    match err {
        ConfigError::Field { field, .. } => field,
        other => panic!("expected a field error, got {other}"),
    }
}

#[test]
fn minimal_file_gets_documented_defaults() {
    let f = Files::new();
    let c = f.load(&f.toml(""), &[]).unwrap();
    assert_eq!(c.server.listen.to_string(), "0.0.0.0:8443");
    assert_eq!(c.server.admin_listen.to_string(), "127.0.0.1:9090");
    assert_eq!(c.tokens.access_token_lifetime, Duration::from_secs(3600));
    assert_eq!(c.keys.rotation_period, Duration::from_secs(30 * 86_400));
    assert_eq!(c.keys.overlap, Duration::from_secs(30 * 86_400));
    assert_eq!(c.issuer(), "https://localhost:8443");
}

#[test]
fn unknown_key_is_refused_naming_it() {
    let f = Files::new();
    let err = f
        .load(&f.toml("[server]\nlisten_port = 8443\n"), &[])
        .unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("server"), "{msg}");
    assert!(msg.contains("listen_port"), "{msg}");
}

#[test]
fn wrong_type_is_refused_naming_the_field() {
    let f = Files::new();
    let err = f
        .load(&f.toml("[server]\nmax_body_bytes = \"lots\"\n"), &[])
        .unwrap_err();
    assert_eq!(field_of(err), "server.max_body_bytes");
}

#[test]
fn unparsable_duration_names_the_field() {
    let f = Files::new();
    let err = f
        .load(
            &f.toml("[tokens]\naccess_token_lifetime = \"an hour\"\n"),
            &[],
        )
        .unwrap_err();
    assert_eq!(field_of(err), "tokens.access_token_lifetime");
}

#[test]
fn missing_certificate_file_names_tls_cert() {
    let f = Files::new();
    let text = f.toml("").replace("cert.pem", "missing.pem");
    let err = f.load(&text, &[]).unwrap_err();
    assert_eq!(field_of(err), "tls.cert");
}

#[test]
fn environment_overrides_the_file() {
    let f = Files::new();
    let c = f
        .load(
            &f.toml("[server]\nlisten = \"0.0.0.0:8443\"\n"),
            &[
                ("PORTCULLIS_SERVER__LISTEN", "127.0.0.1:9443"),
                ("PORTCULLIS_SERVER__MAX_BODY_BYTES", "2048"),
                ("PORTCULLIS_TOKENS__ACCESS_TOKEN_LIFETIME", "15m"),
                ("UNRELATED", "1"),
            ],
        )
        .unwrap();
    assert_eq!(c.server.listen.to_string(), "127.0.0.1:9443");
    assert_eq!(c.server.max_body_bytes, 2048);
    assert_eq!(c.tokens.access_token_lifetime, Duration::from_secs(900));
}

/// Access tokens typed `JWT` (issued before they were typed `at+jwt`, or while they are
/// issued so) are accepted until an operator turns that off, in the file or the
/// environment, once issuing `at+jwt`; a non-boolean is refused.
#[test]
fn accept_jwt_typ_is_on_by_default_and_turned_off_by_file_or_environment() {
    let f = Files::new();
    assert!(f.load(&f.toml(""), &[]).unwrap().tokens.accept_jwt_typ);
    let c = f
        .load(
            &f.toml("[tokens]\naccess_token_typ = \"at+jwt\"\naccept_jwt_typ = false\n"),
            &[],
        )
        .unwrap();
    assert!(!c.tokens.accept_jwt_typ);
    let c = f
        .load(
            &f.toml(""),
            &[
                ("PORTCULLIS_TOKENS__ACCEPT_JWT_TYP", "false"),
                ("PORTCULLIS_TOKENS__ACCESS_TOKEN_TYP", "at+jwt"),
            ],
        )
        .unwrap();
    assert!(!c.tokens.accept_jwt_typ);
    let err = f
        .load(&f.toml("[tokens]\naccept_jwt_typ = \"no\"\n"), &[])
        .unwrap_err();
    assert_eq!(field_of(err), "tokens.accept_jwt_typ");
}

/// Access tokens are signed `typ: JWT` unless `tokens.access_token_typ` says `at+jwt`
/// (either name, any case, in the file or the environment); anything else is refused, and
/// so is issuing `JWT` while `accept_jwt_typ = false` would refuse every token issued.
#[test]
fn access_token_typ_is_jwt_by_default_and_never_one_the_gateway_itself_refuses() {
    let f = Files::new();
    let typ = |toml: &str, env: &[(&str, &str)]| {
        f.load(&f.toml(toml), env)
            .map(|c| c.tokens.access_token_typ.as_str())
    };
    assert_eq!(typ("", &[]).unwrap(), "JWT");
    for (name, canonical) in [
        ("JWT", "JWT"),
        ("jwt", "JWT"),
        ("at+jwt", "at+jwt"),
        ("AT+JWT", "at+jwt"),
        ("At+Jwt", "at+jwt"),
    ] {
        let file = format!("[tokens]\naccess_token_typ = \"{name}\"\n");
        assert_eq!(typ(&file, &[]).unwrap(), canonical, "{name}");
        let env = [("PORTCULLIS_TOKENS__ACCESS_TOKEN_TYP", name)];
        assert_eq!(typ("", &env).unwrap(), canonical, "{name}");
    }
    for bad in [
        "\"application/at+jwt\"",
        "\"at+jwt \"",
        "\"id_token+jwt\"",
        "\"\"",
        "1",
    ] {
        let err = typ(&format!("[tokens]\naccess_token_typ = {bad}\n"), &[]).unwrap_err();
        assert_eq!(field_of(err), "tokens.access_token_typ", "{bad}");
    }

    // JWT issued, JWT refused: every token of ours would get 401, in whatever way it is said
    for (toml, env) in [
        ("[tokens]\naccept_jwt_typ = false\n", &[][..]),
        (
            "[tokens]\naccess_token_typ = \"jwt\"\naccept_jwt_typ = false\n",
            &[][..],
        ),
        (
            "[tokens]\naccess_token_typ = \"at+jwt\"\naccept_jwt_typ = false\n",
            &[("PORTCULLIS_TOKENS__ACCESS_TOKEN_TYP", "JWT")][..],
        ),
    ] {
        let err = typ(toml, env).unwrap_err();
        let message = err.to_string();
        assert_eq!(field_of(err), "tokens.accept_jwt_typ", "{toml} {env:?}");
        assert!(
            message.contains("tokens.access_token_typ"),
            "names what to change first: {message}"
        );
    }
}

#[test]
fn bad_environment_override_names_the_field() {
    let f = Files::new();
    let err = f
        .load(
            &f.toml(""),
            &[("PORTCULLIS_SERVER__LISTEN", "not-an-address")],
        )
        .unwrap_err();
    assert_eq!(field_of(err), "server.listen");
}

#[test]
fn overlap_shorter_than_token_lifetime_is_refused() {
    let f = Files::new();
    let err = f
        .load(
            &f.toml("overlap = \"30m\"\n[tokens]\naccess_token_lifetime = \"1h\"\n"),
            &[],
        )
        .unwrap_err();
    assert_eq!(field_of(err), "keys.overlap");
}

#[test]
fn overlap_shorter_than_the_console_token_lifetime_is_refused() {
    let f = Files::new();
    let text = f.toml(
        "overlap = \"1h\"\n[tokens]\naccess_token_lifetime = \"15m\"\n\
         [sso]\naccess_token_lifetime = \"1h\"\n",
    );
    let err = f.load(&text, &[]).unwrap_err();
    let msg = err.to_string();
    assert_eq!(field_of(err), "keys.overlap");
    assert!(msg.contains("sso.access_token_lifetime = 1h"), "{msg}");
    assert!(msg.contains("1h 30s"), "{msg}");

    // the console lifetime plus the leeway fits
    f.load(
        &text.replace("overlap = \"1h\"", "overlap = \"1h 30s\""),
        &[],
    )
    .unwrap();
}

#[test]
fn vault_source_without_vault_section_is_refused() {
    let f = Files::new();
    let text = f
        .toml("")
        .replace("source = \"file\"", "source = \"vault\"");
    let err = f.load(&text, &[]).unwrap_err();
    assert_eq!(field_of(err), "vault");
}

#[test]
fn public_admin_listener_requires_a_token() {
    let f = Files::new();
    let err = f
        .load(&f.toml("[server]\nadmin_listen = \"0.0.0.0:9090\"\n"), &[])
        .unwrap_err();
    assert_eq!(field_of(err), "admin.token");
}

#[test]
fn database_url_is_never_echoed() {
    let f = Files::new();
    let text = f.toml("").replace("sqlite://", "mysql://user:hunter2@db/");
    let err = f.load(&text, &[]).unwrap_err();
    assert!(!err.to_string().contains("hunter2"));
    assert_eq!(field_of(err), "database.url");
}

#[test]
fn unsupported_algorithm_is_refused() {
    let f = Files::new();
    let text = f.toml("algorithm = \"HS256\"\n");
    let err = f.load(&text, &[]).unwrap_err();
    assert_eq!(field_of(err), "keys.algorithm");
}

#[test]
fn shipped_production_example_is_valid_given_its_files() {
    // deploy/portcullis.toml must stay loadable; its file paths are pointed at stand-in
    // files through the documented environment overrides
    let f = Files::new();
    let d = f.dir.path();
    std::fs::write(d.join("ca.pem"), "x").unwrap();
    std::fs::write(d.join("secret-id"), "x").unwrap();
    std::fs::write(d.join("hash.key"), TEST_HASH_KEY).unwrap();
    let example =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/portcullis.toml");
    let env = [
        ("PORTCULLIS_TLS__CERT", d.join("cert.pem")),
        ("PORTCULLIS_TLS__KEY", d.join("key.pem")),
        ("PORTCULLIS_VAULT__CACERT", d.join("ca.pem")),
        (
            "PORTCULLIS_VAULT__AUTH__SECRET_ID_FILE",
            d.join("secret-id"),
        ),
        ("PORTCULLIS_TOKENS__HASH_KEY_FILE", d.join("hash.key")),
    ]
    .map(|(k, v)| (k.to_owned(), v.display().to_string()));
    let c = load(&example, env).unwrap();
    assert_eq!(c.keys.rotation, RotationKind::External);
    assert!(matches!(
        c.vault.unwrap().auth,
        keyrotation::VaultAuth::AppRole { .. }
    ));
}

/// The documented way to pass a Vault token works; a token put under `auth` is refused
/// (it was dropped, and the instance then failed at start or used another `VAULT_TOKEN`),
/// and AppRole with both a secret id and a file of one is refused as at start-up.
#[test]
fn a_vault_token_goes_beside_auth_and_approle_takes_one_secret_id() {
    let f = Files::new();
    let vault = "[vault]\naddr = \"https://vault.example:8200\"\n";
    let c = f
        .load(
            &f.toml(vault),
            &[("PORTCULLIS_VAULT__TOKEN", "hvs.from-the-environment")],
        )
        .unwrap();
    let v = c.vault.unwrap();
    assert!(matches!(v.auth, keyrotation::VaultAuth::Token {}));
    assert_eq!(
        v.token.as_ref().map(|t| t.expose_secret().to_owned()),
        Some("hvs.from-the-environment".to_owned())
    );
    let err = f
        .load(
            &f.toml(&format!("{vault}[vault.auth]\nmethod = \"token\"\n")),
            &[("PORTCULLIS_VAULT__AUTH__TOKEN", "hvs.misplaced")],
        )
        .unwrap_err();
    assert!(field_of(err).starts_with("vault"));
    std::fs::write(f.dir.path().join("secret-id"), "x").unwrap();
    let both = format!(
        "{vault}[vault.auth]\nmethod = \"approle\"\nrole_id = \"r\"\nsecret_id = \"s\"\n\
         secret_id_file = \"{}\"\n",
        f.dir.path().join("secret-id").display()
    );
    let err = f.load(&f.toml(&both), &[]).unwrap_err();
    assert_eq!(field_of(err), "vault.auth.secret_id");
}

#[test]
fn missing_or_short_hash_key_is_refused() {
    let f = Files::new();
    let path = f.dir.path().join("p.toml");
    std::fs::write(&path, f.toml("")).unwrap();
    let err = load(&path, std::iter::empty()).unwrap_err();
    assert_eq!(field_of(err), "tokens.hash_key");
    let short = (
        "PORTCULLIS_TOKENS__HASH_KEY".to_owned(),
        "c2hvcnQ=".to_owned(),
    );
    let err = load(&path, std::iter::once(short)).unwrap_err();
    assert_eq!(field_of(err), "tokens.hash_key");
}

const PROVIDER: &str = "[[sso.providers]]\nname = \"corp\"\nissuer = \"https://idp.example.com\"\n\
                        client_id = \"portcullis\"\nclient_secret = \"s3cret\"\n";

#[test]
fn an_sso_provider_and_role_rules_load_with_their_defaults() {
    let f = Files::new();
    let text = f.toml(&format!(
        "{PROVIDER}[[sso.roles]]\nrole = \"admin\"\ngroups = [\"ops\"]\nprovider = \"corp\"\n"
    ));
    let c = f.load(&text, &[]).unwrap();
    let p = &c.sso.providers[0];
    assert_eq!(p.scopes, ["openid", "email", "profile"]);
    assert_eq!(p.id_token_algorithms, ["RS256", "ES256"]);
    assert_eq!(c.sso.access_token_lifetime, Duration::from_secs(300));
    assert!(!c.sso.local_accounts);
    assert_eq!(c.protection.lockout.max_failures, 10);
    assert_eq!(c.protection.lockout.account_max_failures, 100);
}

#[test]
fn unsafe_or_inconsistent_sso_settings_are_refused_naming_the_field() {
    let f = Files::new();
    for (extra, field) in [
        (
            PROVIDER.replace("https://idp.example.com", "http://idp.example.com"),
            "sso.providers[0].issuer",
        ),
        (
            format!("{PROVIDER}id_token_algorithms = [\"HS256\"]\n"),
            "sso.providers[0].id_token_algorithms",
        ),
        (
            PROVIDER.replace("client_secret = \"s3cret\"\n", ""),
            "sso.providers[0].client_secret_file",
        ),
        (format!("{PROVIDER}{PROVIDER}"), "sso.providers[1].name"),
        // `local:<name>` are the break-glass accounts' subjects
        (
            PROVIDER.replace("name = \"corp\"", "name = \"Local\""),
            "sso.providers[0].name",
        ),
        (
            format!(
                "{PROVIDER}[[sso.roles]]\nrole = \"admin\"\nprovider = \"other\"\ngroups = [\"x\"]\n"
            ),
            "sso.roles[0].provider",
        ),
        (
            format!("{PROVIDER}[[sso.roles]]\nrole = \"admin\"\n"),
            "sso.roles[0]",
        ),
        (
            "[sso]\nconsole_client_id = \"admin\"\n".to_owned(),
            "sso.console_client_id",
        ),
        (
            "[protection]\ntrusted_proxies = [\"10.0.0.0/33\"]\n".to_owned(),
            "protection.trusted_proxies[0]",
        ),
        (
            "[protection.lockout]\nfree_failures = 5\nmax_failures = 5\n".to_owned(),
            "protection.lockout",
        ),
        (
            "[protection.lockout]\nmax_failures = 10\naccount_max_failures = 9\n".to_owned(),
            "protection.lockout",
        ),
        (
            "[protection.auth_rate]\nburst = 0\nreplenish_every = \"1s\"\n".to_owned(),
            "protection.auth_rate.burst",
        ),
    ] {
        let err = f.load(&f.toml(&extra), &[]).unwrap_err();
        assert_eq!(field_of(err), field, "{extra}");
    }
}

#[test]
fn the_console_session_max_lifetime_defaults_to_12h_and_is_bounded_by_the_access_token_naming_the_field()
 {
    let f = Files::new();
    let c = f.load(&f.toml(PROVIDER), &[]).unwrap();
    assert_eq!(c.sso.session_max_lifetime, Duration::from_secs(12 * 3600));
    let c = f
        .load(
            &f.toml(PROVIDER),
            &[("PORTCULLIS_SSO__SESSION_MAX_LIFETIME", "8h")],
        )
        .unwrap();
    assert_eq!(c.sso.session_max_lifetime, Duration::from_secs(8 * 3600));

    // not longer than the console access token, which would outlive it
    for max in ["5m", "1m"] {
        let err = f
            .load(
                &f.toml(&format!(
                    "[sso]\nsession_max_lifetime = \"{max}\"\n{PROVIDER}"
                )),
                &[],
            )
            .unwrap_err();
        let msg = err.to_string();
        assert_eq!(field_of(err), "sso.session_max_lifetime", "{max}");
        assert!(msg.contains("sso.access_token_lifetime (5m)"), "{msg}");
    }
    // longer than the refresh family it rides on is no error: the family's end comes
    // first (a configuration from before this setting, with a short absolute lifetime,
    // still starts)
    let text = f.toml(&format!(
        "[refresh]\nabsolute_lifetime = \"10h\"\n[sso]\nsession_max_lifetime = \"11h\"\n{PROVIDER}"
    ));
    f.load(&text, &[]).unwrap();
    f.load(
        &f.toml(&format!(
            "[refresh]\nabsolute_lifetime = \"8h\"\n{PROVIDER}"
        )),
        &[],
    )
    .unwrap();
    // with no console sessions at all, a short absolute lifetime needs no [sso] setting
    f.load(&f.toml("[refresh]\nabsolute_lifetime = \"3h\"\n"), &[])
        .unwrap();
}

#[test]
fn a_plain_http_provider_is_accepted_on_loopback_only() {
    let f = Files::new();
    let text = f.toml(&PROVIDER.replace("https://idp.example.com", "http://127.0.0.1:8080"));
    assert!(f.load(&text, &[]).is_ok());
}

#[test]
fn proxy_routes_load_and_upstreams_come_from_the_environment() {
    let f = Files::new();
    let c = f
        .load(
            &f.toml(
                "[proxy]\nread_timeout = \"20s\"\n\
                 [[proxy.routes]]\nprefix = \"/api/\"\nauth = \"bearer\"\n\
                 scopes = [\"scheduler:executor\"]\n\
                 [[proxy.routes]]\nprefix = \"/\"\nauth = \"session\"\n",
            ),
            &[(
                "PORTCULLIS_PROXY__UPSTREAMS",
                "[\"http://10.0.0.5:8080\", \"http://10.0.0.6:8080\"]",
            )],
        )
        .unwrap();
    assert_eq!(c.proxy.upstreams.len(), 2);
    assert_eq!(c.proxy.read_timeout, Duration::from_secs(20));
    assert_eq!(c.proxy.connect_timeout, Duration::from_secs(2));
    assert_eq!(c.proxy.health.failures, 3);
    assert_eq!(
        c.proxy.upgrade_session_check_interval,
        Duration::from_secs(30)
    );
    assert_eq!(c.proxy.routes.len(), 2);
}

#[test]
fn unsafe_or_inconsistent_proxy_settings_are_refused_naming_the_field() {
    let f = Files::new();
    let up = "[proxy]\nupstreams = [\"http://10.0.0.5:8080\"]\n";
    for (extra, field) in [
        (
            "[proxy]\nupstreams = [\"ftp://10.0.0.5\"]\n".to_owned(),
            "proxy.upstreams[0]",
        ),
        (
            format!("{up}tls_client_key = \"/etc/portcullis/node-client.key\"\n"),
            "proxy.tls_client_cert",
        ),
        (
            format!("{up}[[proxy.routes]]\nprefix = \"/public/..;/x\"\nauth = \"public\"\n"),
            "proxy.routes[0].prefix",
        ),
        (
            format!("{up}[[proxy.routes]]\nprefix = \"/oauth2/\"\nauth = \"public\"\n"),
            "proxy.routes[0].prefix",
        ),
        (
            format!(
                "{up}[[proxy.routes]]\nprefix = \"/x/\"\nauth = \"session\"\nscopes = [\"a\"]\n"
            ),
            "proxy.routes[0].scopes",
        ),
        (
            "[[proxy.routes]]\nprefix = \"/x/\"\nauth = \"public\"\n".to_owned(),
            "proxy.upstreams",
        ),
        (
            format!("{up}read_timeout = \"31s\"\n"),
            "proxy.read_timeout",
        ),
        (
            format!("{up}upgrade_session_check_interval = \"0s\"\n"),
            "proxy.upgrade_session_check_interval",
        ),
        (
            format!("{up}upgrade_session_check_interval = \"2h\"\n"),
            "proxy.upgrade_session_check_interval",
        ),
    ] {
        let err = f.load(&f.toml(&extra), &[]).unwrap_err();
        assert_eq!(field_of(err), field, "{extra}");
    }
}

#[test]
fn the_audit_sink_is_none_by_default_and_each_bad_value_names_audit_sink() {
    let f = Files::new();
    let c = f.load(&f.toml(""), &[]).unwrap();
    assert_eq!(c.audit.sink, AuditSinkKind::None);
    let d = f.dir.path().display();
    let c = f
        .load(
            &f.toml(&format!("[audit]\nsink = \"file:{d}/audit.jsonl\"\n")),
            &[],
        )
        .unwrap();
    assert_eq!(
        c.audit.sink,
        AuditSinkKind::File(f.dir.path().join("audit.jsonl"))
    );
    let c = f
        .load(&f.toml(""), &[("PORTCULLIS_AUDIT__SINK", "stdout")])
        .unwrap();
    assert_eq!(c.audit.sink, AuditSinkKind::Stdout);
    for bad in [
        "sink = \"syslog\"".to_owned(),
        "sink = \"file:relative/audit.jsonl\"".to_owned(),
        format!("sink = \"file:{d}/missing-dir/audit.jsonl\""),
        format!("sink = \"file:{d}\""),
        "sinks = \"stdout\"".to_owned(),
    ] {
        let err = f
            .load(&f.toml(&format!("[audit]\n{bad}\n")), &[])
            .unwrap_err();
        assert!(field_of(err).starts_with("audit.sink"), "{bad}");
    }
}

#[test]
fn the_audit_queue_holds_65536_events_by_default_and_a_capacity_out_of_range_is_refused_naming_it()
{
    let f = Files::new();
    let c = f.load(&f.toml(""), &[]).unwrap();
    assert_eq!(c.audit.queue_capacity, 65_536);
    let c = f
        .load(&f.toml("[audit]\nqueue_capacity = 1024\n"), &[])
        .unwrap();
    assert_eq!(c.audit.queue_capacity, 1_024);
    let c = f
        .load(
            &f.toml("[audit]\nqueue_capacity = 1024\n"),
            &[("PORTCULLIS_AUDIT__QUEUE_CAPACITY", "4194304")],
        )
        .unwrap();
    assert_eq!(c.audit.queue_capacity, 4_194_304, "the environment wins");

    for bad in ["0", "1023", "4194305", "-1", "\"lots\"", "1.5"] {
        let err = f
            .load(&f.toml(&format!("[audit]\nqueue_capacity = {bad}\n")), &[])
            .unwrap_err();
        assert_eq!(field_of(err), "audit.queue_capacity", "{bad}");
    }
    let err = f
        .load(&f.toml(""), &[("PORTCULLIS_AUDIT__QUEUE_CAPACITY", "100")])
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "invalid configuration at `audit.queue_capacity`: must be between 1024 and 4194304 \
         (events)"
    );
}

#[test]
fn idle_timeout_defaults_to_two_minutes_and_zero_or_garbage_is_refused_naming_it() {
    let f = Files::new();
    let c = f.load(&f.toml(""), &[]).unwrap();
    assert_eq!(c.server.idle_timeout, Duration::from_secs(120));
    let c = f
        .load(&f.toml(""), &[("PORTCULLIS_SERVER__IDLE_TIMEOUT", "75s")])
        .unwrap();
    assert_eq!(c.server.idle_timeout, Duration::from_secs(75));

    // zero would keep idle connections forever: refused, not read as "never"
    let err = f
        .load(&f.toml("[server]\nidle_timeout = \"0s\"\n"), &[])
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "invalid configuration at `server.idle_timeout`: must be greater than 0"
    );
    let err = f
        .load(&f.toml(""), &[("PORTCULLIS_SERVER__IDLE_TIMEOUT", "soon")])
        .unwrap_err();
    assert_eq!(field_of(err), "server.idle_timeout");
}

/// Values an operator may write meaning "no limit" or "no timeout" are refused naming
/// the field, rather than accepted and failing once served: a connection limit past what
/// the listener's semaphore counts panicked its task at start-up, and a zero wait timed
/// out every database or Redis call at once.
#[test]
fn no_limit_and_no_timeout_spellings_are_refused_naming_the_field() {
    let f = Files::new();
    for (text, env, field) in [
        (
            "[server]\nmax_connections = 3000000000000000000\n",
            None,
            "server.max_connections",
        ),
        (
            "[server]\nmax_connections = 10000001\n",
            None,
            "server.max_connections",
        ),
        (
            "",
            Some(("PORTCULLIS_DATABASE__ACQUIRE_TIMEOUT", "0s")),
            "database.acquire_timeout",
        ),
        (
            "[redis]\nurl = \"redis://127.0.0.1:6379\"\ncommand_timeout = \"0s\"\n",
            None,
            "redis.command_timeout",
        ),
    ] {
        let env: Vec<(&str, &str)> = env.into_iter().collect();
        let err = f.load(&f.toml(text), &env).unwrap_err();
        assert_eq!(field_of(err), field, "{text} {env:?}");
    }
    let c = f
        .load(&f.toml("[server]\nmax_connections = 10000000\n"), &[])
        .unwrap();
    assert_eq!(c.server.max_connections, 10_000_000);
}

#[test]
fn workers_default_to_one_per_core_zero_means_the_shared_runtime_and_too_many_are_refused() {
    let f = Files::new();
    let c = f.load(&f.toml(""), &[]).unwrap();
    assert_eq!(
        c.server.workers, None,
        "unset: one per core, decided at start"
    );
    let c = f
        .load(&f.toml(""), &[("PORTCULLIS_SERVER__WORKERS", "0")])
        .unwrap();
    assert_eq!(c.server.workers, Some(0));
    let c = f.load(&f.toml("[server]\nworkers = 3\n"), &[]).unwrap();
    assert_eq!(c.server.workers, Some(3));

    let err = f
        .load(&f.toml("[server]\nworkers = 65\n"), &[])
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "invalid configuration at `server.workers`: must be at most 64"
    );
    let err = f
        .load(&f.toml("[server]\nworkers = -1\n"), &[])
        .unwrap_err();
    assert_eq!(field_of(err), "server.workers");
}

#[test]
fn database_min_connections_defaults_to_four_and_may_not_exceed_the_pool() {
    let f = Files::new();
    let c = f.load(&f.toml(""), &[]).unwrap();
    assert_eq!(c.database.min_connections, 4);
    let err = f
        .load(
            &f.toml("").replace(
                "[database]\n",
                "[database]\nmax_connections = 2\nmin_connections = 3\n",
            ),
            &[],
        )
        .unwrap_err();
    assert_eq!(field_of(err), "database.min_connections");
}

/// Each field of a per-IP bucket defaults on its own, to the default of its own table
/// (`auth_rate` and `token_rate` differ): setting only `burst`, in the file or the
/// environment, keeps the table's `replenish_every`, and the other way round. A value of
/// the wrong type or an unknown field is still refused, naming it.
#[test]
fn a_rate_field_set_alone_keeps_the_other_at_its_tables_default() {
    use crate::protect::RateSettings;
    let rate = |burst, ms| RateSettings {
        burst,
        replenish_every: Duration::from_millis(ms),
    };
    let f = Files::new();

    // the documented defaults
    let c = f.load(&f.toml(""), &[]).unwrap();
    assert_eq!(c.protection.auth_rate, rate(20, 3000));
    assert_eq!(c.protection.token_rate, rate(300, 10));

    // only `burst`, in the file
    let c = f
        .load(
            &f.toml("[protection.auth_rate]\nburst = 5\n[protection.token_rate]\nburst = 7\n"),
            &[],
        )
        .unwrap();
    assert_eq!(c.protection.auth_rate, rate(5, 3000));
    assert_eq!(c.protection.token_rate, rate(7, 10));

    // only `burst`, in the environment
    let c = f
        .load(
            &f.toml(""),
            &[
                ("PORTCULLIS_PROTECTION__AUTH_RATE__BURST", "5"),
                ("PORTCULLIS_PROTECTION__TOKEN_RATE__BURST", "7"),
            ],
        )
        .unwrap();
    assert_eq!(c.protection.auth_rate, rate(5, 3000));
    assert_eq!(c.protection.token_rate, rate(7, 10));

    // only `replenish_every`, in the environment over a file that sets the other table
    let c = f
        .load(
            &f.toml("[protection.token_rate]\nburst = 50\n"),
            &[
                ("PORTCULLIS_PROTECTION__AUTH_RATE__REPLENISH_EVERY", "1s"),
                ("PORTCULLIS_PROTECTION__TOKEN_RATE__REPLENISH_EVERY", "20ms"),
            ],
        )
        .unwrap();
    assert_eq!(c.protection.auth_rate, rate(20, 1000));
    assert_eq!(c.protection.token_rate, rate(50, 20));

    for (extra, field) in [
        (
            "[protection.token_rate]\nburst = \"many\"\n",
            "protection.token_rate.burst",
        ),
        (
            "[protection.auth_rate]\nreplenish_every = \"often\"\n",
            "protection.auth_rate.replenish_every",
        ),
        (
            "[protection.auth_rate]\nburst = 0\n",
            "protection.auth_rate.burst",
        ),
    ] {
        let err = f.load(&f.toml(extra), &[]).unwrap_err();
        assert_eq!(field_of(err), field, "{extra}");
    }
    let err = f
        .load(&f.toml("[protection.auth_rate]\nbursts = 5\n"), &[])
        .unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("protection.auth_rate"), "{msg}");
    assert!(msg.contains("bursts"), "{msg}");
}
