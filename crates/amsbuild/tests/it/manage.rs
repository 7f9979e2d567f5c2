//! The message panel, the account page (tokens, password), user management by ADMIN and
//! SERVER ADMIN, and project creation from the web, over real HTTP.

use crate::harness::*;
use crate::web::Web;
use serde_json::json;
use std::time::Duration;

const PW: &str = "correct horse battery";

fn location(head: &str) -> String {
    head.lines()
        .find(|l| l.starts_with("location:"))
        .map(|l| l["location:".len()..].trim().to_string())
        .unwrap_or_default()
}

fn user_list(h: &TestHost) -> String {
    String::from_utf8_lossy(&h.cli(&["user", "list"]).stdout).to_string()
}

fn line_of<'a>(list: &'a str, user: &str) -> &'a str {
    list.lines()
        .find(|l| l.split_whitespace().next() == Some(user))
        .unwrap_or("")
}

#[test]
fn the_message_panel_keeps_action_and_build_results_for_the_next_visit() {
    let w = Web::new(json!({}));
    add_user(&w.h, "other", "3", "mine", PW);
    let cookie = w.session("mod", PW);
    let (st, _, dash) = w.get("/ams-build/", &cookie);
    assert_eq!(st, 200);
    assert!(dash.contains("No messages."));

    let (st, head, _) = w.post_form(
        "/ams-build/projects/mine/build",
        &cookie,
        &[("branch", ""), ("commit", "")],
    );
    assert_eq!(st, 303, "{head}");
    let name = location(&head).rsplit('/').next().unwrap().to_string();
    let rec = w.h.wait_status("mine", &name, Duration::from_secs(60));
    let status = rec["status"].as_str().unwrap().to_uppercase();
    // A refused action is a message too.
    let (st, _, body) = w.post_form(
        "/ams-build/projects/mine/build",
        &cookie,
        &[("branch", "$(touch /tmp/x)"), ("commit", "")],
    );
    assert_eq!(st, 400, "{body}");

    // The next visit, in a new session, still has them, newest first, linked to the build.
    let (st, head) = w.login("mod", PW, "", None);
    assert_eq!(st, 303);
    let cookie2 = Web::cookie(&head);
    let (_, _, dash) = w.get("/ams-build/", &cookie2);
    let queued = dash
        .find(&format!("Queued build {name}"))
        .expect("the trigger's result");
    let ended = dash
        .find(&format!("Build {name} ended {status}"))
        .unwrap_or_else(|| panic!("the build's result in {dash}"));
    let refused = dash
        .find("Could not trigger a build of mine")
        .expect("the refusal");
    assert!(refused < ended && ended < queued, "newest first");
    assert!(dash.contains(&format!("href=\"/ams-build/build/mine/{name}\"")));
    // The fragment pushed to live dashboards carries them too.
    let (_, _, panels) = w.get("/ams-build/panels", &cookie2);
    assert!(panels.contains(&format!("Build {name} ended {status}")));

    // Another user of the same project sees none of them.
    let other = w.session("other", PW);
    let (_, _, dash) = w.get("/ams-build/", &other);
    assert!(!dash.contains("Queued build"), "{dash}");
    assert!(dash.contains("No messages."));

    // Clearing is a CSRF-checked POST and empties the panel.
    let (st, _, _) = http_full(
        &w.addr,
        "POST",
        "/ams-build/messages/clear",
        &[
            ("Cookie", cookie2.clone()),
            ("Content-Type", "application/x-www-form-urlencoded".into()),
        ],
        b"csrf=0000",
    );
    assert_eq!(st, 403);
    assert!(w.get("/ams-build/", &cookie2).2.contains("Queued build"));
    let (st, _, _) = w.post_form("/ams-build/messages/clear", &cookie2, &[]);
    assert_eq!(st, 303);
    assert!(w.get("/ams-build/", &cookie2).2.contains("No messages."));
}

#[test]
fn tokens_and_the_password_are_managed_from_the_account_page() {
    let w = Web::new(json!({}));
    add_user(&w.h, "other", "3", "mine", PW);
    let cookie = w.session("mod", PW);
    let (st, _, page) = w.post_form(
        "/ams-build/account/tokens",
        &cookie,
        &[("label", "ci <b>"), ("current", PW)],
    );
    assert_eq!(st, 200);
    let tag = "<pre id=\"new-token\">";
    let i = page.find(tag).expect("the new token") + tag.len();
    let token = page[i..page[i..].find('<').unwrap() + i].to_string();
    assert!(token.starts_with("ams_") && token.len() > 60, "{token}");
    assert!(page.contains("ci &lt;b&gt;"), "labels are escaped");
    let bearer = |t: &str| {
        http(
            &w.addr,
            "GET",
            "/ams-build/api/user",
            &[("Authorization", format!("Bearer {t}"))],
            b"",
        )
        .0
    };
    assert_eq!(bearer(&token), 200);
    // Listed by label, never shown again.
    let (_, _, account) = w.get("/ams-build/account", &cookie);
    assert!(account.contains("ci &lt;b&gt;"));
    assert!(!account.contains(&token));
    let i =
        account.find("/ams-build/account/tokens/").unwrap() + "/ams-build/account/tokens/".len();
    let id: String = account[i..]
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    let revoke = format!("/ams-build/account/tokens/{id}/revoke");
    // Another user cannot revoke it.
    let other = w.session("other", PW);
    assert_eq!(w.post_form(&revoke, &other, &[]).0, 404);
    assert_eq!(bearer(&token), 200);
    // Its owner can.
    assert_eq!(w.post_form(&revoke, &cookie, &[]).0, 303);
    assert_eq!(bearer(&token), 401);
    // A token made now does not outlive the password change below.
    let (_, _, page) = w.post_form(
        "/ams-build/account/tokens",
        &cookie,
        &[("label", "kept?"), ("current", PW)],
    );
    let i = page.find(tag).expect("the new token") + tag.len();
    let token = page[i..page[i..].find('<').unwrap() + i].to_string();
    assert_eq!(bearer(&token), 200);

    // Password: the current one is required; a change ends every session.
    let (st, _, _) = w.post_form(
        "/ams-build/account/password",
        &cookie,
        &[("current", "wrong"), ("new", "a brand new password")],
    );
    assert_eq!(st, 403);
    let (st, _, _) = w.post_form(
        "/ams-build/account/password",
        &cookie,
        &[("current", PW), ("new", "short")],
    );
    assert_eq!(st, 400);
    let (st, head, _) = w.post_form(
        "/ams-build/account/password",
        &cookie,
        &[("current", PW), ("new", "a brand new password")],
    );
    assert_eq!(st, 303, "{head}");
    assert_eq!(w.get("/ams-build/api/user", &cookie).0, 401);
    assert_eq!(bearer(&token), 401, "the password change revoked the token");
    assert_eq!(w.login("mod", PW, "", None).0, 401);
    assert_eq!(w.login("mod", "a brand new password", "", None).0, 303);
}

#[test]
fn admins_manage_the_users_of_their_own_projects_and_server_admins_everything() {
    let w = Web::new(json!({}));
    w.h.project(
        "other",
        &pipeline_with(json!([stage("s", &["true"])]), json!({"dummy-build": true})),
    );
    add_user(&w.h, "adm", "4", "mine", PW);
    add_user(&w.h, "peer", "4", "mine", PW);
    add_user(&w.h, "out", "3", "other", PW);
    add_user(&w.h, "both", "3", "mine,other", PW);
    add_user(&w.h, "root", "5", "", PW);
    let adm = w.session("adm", PW);

    let (st, _, page) = w.get("/ams-build/users", &adm);
    assert_eq!(st, 200);
    assert!(page.contains("id=\"save-mod\"") && page.contains("id=\"save-both\""));
    assert!(
        !page.contains("save-out"),
        "users of other projects are not shown"
    );
    assert!(!page.contains("save-peer"), "peers are not managed");
    assert!(
        !page.contains("p-mod-other"),
        "only the admin's projects are offered"
    );
    assert!(
        !page.contains("create-project"),
        "only SERVER ADMIN creates projects"
    );
    assert!(!page.contains(">SERVER ADMIN<") && !page.contains(">ADMIN<"));

    // Add a user to an own project.
    let (st, head, _) = w.post_form(
        "/ams-build/users",
        &adm,
        &[
            ("name", "newbie"),
            ("password", "newbie password"),
            ("level", "1"),
            ("projects", "mine"),
        ],
    );
    assert_eq!(st, 303, "{head}");
    let newbie = w.session("newbie", "newbie password");
    assert_eq!(w.get("/ams-build/api/projects/name/mine", &newbie).0, 200);
    // Refused: a level at or above ADMIN, a project not managed, no project, a weak password.
    for (pairs, why) in [
        (vec![("level", "4"), ("projects", "mine")], "admin level"),
        (vec![("level", "1"), ("projects", "other")], "other project"),
        (vec![("level", "1")], "no project"),
    ] {
        let mut all = vec![("name", "x1"), ("password", "long enough password")];
        all.extend(pairs);
        let (st, _, _) = w.post_form("/ams-build/users", &adm, &all);
        assert!(st == 403 || st == 400, "{why}: {st}");
    }
    assert!(line_of(&user_list(&w.h), "x1").is_empty());

    // A user who also works elsewhere is not removed by an ADMIN of one project.
    let (st, _, body) = w.post_form("/ams-build/users/both/remove", &adm, &[]);
    assert_eq!(st, 403);
    assert!(body.contains("take them off your projects"), "{body}");
    // Change a user: the admin's projects follow the boxes; the others keep their level.
    let (st, _, _) = w.post_form("/ams-build/users/both", &adm, &[("level", "1")]);
    assert_eq!(st, 303);
    let list = user_list(&w.h);
    let line = line_of(&list, "both");
    assert!(
        line.ends_with("MODERATOR on other") && !line.contains("mine"),
        "{line}"
    );
    // Users out of reach answer 404 whether or not they exist; peers and self are refused.
    assert_eq!(
        w.post_form("/ams-build/users/out", &adm, &[("level", "1")])
            .0,
        404
    );
    assert_eq!(
        w.post_form("/ams-build/users/ghost", &adm, &[("level", "1")])
            .0,
        404
    );
    assert_eq!(
        w.post_form(
            "/ams-build/users/peer",
            &adm,
            &[("level", "1"), ("projects", "mine")]
        )
        .0,
        404
    );
    assert_eq!(w.post_form("/ams-build/users/adm/remove", &adm, &[]).0, 403);
    // After the change `both` is no longer on any of adm's projects: out of reach.
    assert_eq!(
        w.post_form("/ams-build/users/both/remove", &adm, &[]).0,
        404
    );
    assert!(!line_of(&user_list(&w.h), "both").is_empty());
    assert_eq!(
        w.post_form("/ams-build/users/newbie/remove", &adm, &[]).0,
        303
    );
    assert!(line_of(&user_list(&w.h), "newbie").is_empty());
    assert_eq!(
        w.get("/ams-build/api/user", &newbie).0,
        401,
        "sessions end with the user"
    );
    // ADMIN may not set passwords.
    assert_eq!(
        w.post_form(
            "/ams-build/users/mod/password",
            &adm,
            &[("password", "another password")]
        )
        .0,
        403
    );
    // Lower levels have no user management.
    let m = w.session("mod", PW);
    assert_eq!(w.get("/ams-build/users", &m).0, 403);
    assert_eq!(
        w.post_form(
            "/ams-build/users",
            &m,
            &[
                ("name", "x2"),
                ("password", "long enough password"),
                ("level", "1")
            ]
        )
        .0,
        403
    );
    // The action results are the admin's messages.
    let (_, _, dash) = w.get("/ams-build/", &adm);
    assert!(dash.contains("Added the user newbie") && dash.contains("Removed the user newbie"));

    // SERVER ADMIN: everyone, any level, passwords, projects.
    let root = w.session("root", PW);
    let (_, _, page) = w.get("/ams-build/users", &root);
    for u in ["adm", "peer", "out", "both", "mod"] {
        assert!(page.contains(&format!("id=\"save-{u}\"")), "{u}");
    }
    assert!(page.contains("create-project"));
    assert_eq!(
        w.post_form("/ams-build/users/peer", &root, &[("level", "5")])
            .0,
        303
    );
    assert!(line_of(&user_list(&w.h), "peer").contains("SERVER ADMIN"));
    assert_eq!(
        w.post_form("/ams-build/users/root", &root, &[("level", "1")])
            .0,
        403,
        "no one demotes themselves here"
    );
    assert_eq!(
        w.post_form(
            "/ams-build/users/mod/password",
            &root,
            &[("password", "reset by root!")]
        )
        .0,
        303
    );
    assert_eq!(
        w.get("/ams-build/api/user", &m).0,
        401,
        "a reset ends the sessions"
    );
    w.session("mod", "reset by root!");
    assert_eq!(
        w.post_form("/ams-build/users/out/remove", &root, &[]).0,
        303
    );

    // Projects from the web: a blank one, then a git clone; bad names are refused.
    let (st, _, _) = w.post_form(
        "/ams-build/projects",
        &root,
        &[("name", "fresh"), ("git", "")],
    );
    assert_eq!(st, 303);
    let src = w.h.tmp.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    git(&src, &["init", "-q", "-b", "main"]);
    std::fs::write(
        src.join("pipeline.json"),
        pipeline(json!([stage("s", &["true"])])),
    )
    .unwrap();
    git(&src, &["add", "."]);
    git(&src, &["commit", "-q", "-m", "first"]);
    let (st, _, body) = w.post_form(
        "/ams-build/projects",
        &root,
        &[
            ("name", "cloned"),
            ("git", src.to_str().unwrap()),
            ("branch", "main"),
        ],
    );
    assert_eq!(st, 303, "{body}");
    let projects = String::from_utf8_lossy(&w.h.cli(&["project", "list"]).stdout).to_string();
    assert!(
        projects.contains("fresh") && projects.contains("cloned"),
        "{projects}"
    );
    for bad in ["../escape", "a/b", ""] {
        let (st, _, _) = w.post_form("/ams-build/projects", &root, &[("name", bad), ("git", "")]);
        assert_eq!(st, 400, "{bad:?}");
    }
    assert!(!w.h.data.join("escape").exists());
    // An ADMIN cannot create projects.
    assert_eq!(
        w.post_form(
            "/ams-build/projects",
            &adm,
            &[("name", "nope"), ("git", "")]
        )
        .0,
        403
    );
}

/// The attack of the security issue: an ADMIN of `mine` changes a user it shares with
/// `other`. Whatever the form says, the user's level on `other` stays what it was.
#[test]
fn an_admin_of_one_project_never_changes_a_users_level_on_another() {
    let w = Web::new(json!({}));
    w.h.project(
        "other",
        &pipeline_with(json!([stage("s", &["true"])]), json!({"dummy-build": true})),
    );
    add_user(&w.h, "adm", "4", "mine", PW);
    add_user(&w.h, "shared", "1", "mine,other", PW);
    let token = api_token(&w.h, "shared");
    let as_shared = |method: &str, path: &str| {
        http(
            &w.addr,
            method,
            &format!("/ams-build/api{path}"),
            &[("Authorization", format!("Bearer {token}"))],
            b"",
        )
        .0
    };
    // What `shared` may do on `other`: view, not trigger. Checked after every attempt.
    let still_user_on_other = |after: &str| {
        assert_eq!(
            as_shared("GET", "/projects/name/other"),
            200,
            "{after}: shared lost `other`"
        );
        assert_eq!(
            as_shared("POST", "/projects/name/other/build"),
            403,
            "{after}: shared was raised on `other`"
        );
        assert!(
            line_of(&user_list(&w.h), "shared").contains("USER on other"),
            "{after}: {}",
            user_list(&w.h)
        );
    };
    still_user_on_other("at first");
    let adm = w.session("adm", PW);
    let (_, _, page) = w.get("/ams-build/users", &adm);
    assert!(page.contains("id=\"p-shared-mine\""), "{page}");
    assert!(
        !page.contains("p-shared-other"),
        "only the admin's projects are offered"
    );

    // The described system's form shape, one level and the admin's own project: allowed,
    // and it now means MODERATOR on `mine` only (it used to raise `shared` everywhere).
    let (st, head, body) = w.post_form(
        "/ams-build/users/shared",
        &adm,
        &[("level", "3"), ("projects", "mine")],
    );
    assert_eq!(st, 303, "{head}{body}");
    assert_eq!(as_shared("POST", "/projects/name/mine/build"), 202);
    still_user_on_other("MODERATOR on mine");
    // Locking `shared` out through its level: NO AUTH on `mine` does not reach `other`.
    let (st, _, _) = w.post_form(
        "/ams-build/users/shared",
        &adm,
        &[("level", "0"), ("projects", "mine")],
    );
    assert_eq!(st, 303);
    assert_eq!(as_shared("GET", "/projects/name/mine"), 404);
    still_user_on_other("NO AUTH on mine");

    // Any attempt to set a level on `other` is refused, and changes nothing at all.
    for (pairs, why) in [
        (
            vec![("level:mine", "1"), ("level:other", "3")],
            "MODERATOR on other",
        ),
        (vec![("level:other", "1")], "USER on other"),
        (vec![("level:other", "0")], "NO AUTH on other"),
        (vec![("level:other", "")], "off other"),
        (
            vec![("level", "3"), ("projects", "other")],
            "old shape, other",
        ),
        (
            vec![("level", "1"), ("projects", "mine"), ("projects", "other")],
            "old shape, both",
        ),
        (vec![("level:mine", "4")], "ADMIN on mine"),
        (
            vec![("level:mine", "1"), ("server_admin", "on")],
            "SERVER ADMIN",
        ),
    ] {
        let (st, _, body) = w.post_form("/ams-build/users/shared", &adm, &pairs);
        assert_eq!(st, 403, "{why}: {body}");
        still_user_on_other(why);
        assert!(
            line_of(&user_list(&w.h), "shared").contains("NO AUTH on mine"),
            "{why}: the refused change changed `mine`"
        );
    }
    let (_, _, body) = w.post_form("/ams-build/users/shared", &adm, &[("level:other", "3")]);
    assert!(
        body.contains("you do not administer project `other`"),
        "{body}"
    );
    // Removing `shared` would take it off `other` too: refused.
    assert_eq!(
        w.post_form("/ams-build/users/shared/remove", &adm, &[]).0,
        403
    );
    still_user_on_other("remove");

    // The per-project form changes what it names: back to USER on mine.
    let (st, _, _) = w.post_form("/ams-build/users/shared", &adm, &[("level:mine", "1")]);
    assert_eq!(st, 303);
    assert_eq!(as_shared("GET", "/projects/name/mine"), 200);
    still_user_on_other("USER on mine");
    // Taking `shared` off `mine` leaves it on `other`, out of the admin's reach.
    let (st, _, _) = w.post_form("/ams-build/users/shared", &adm, &[("level:mine", "")]);
    assert_eq!(st, 303);
    assert_eq!(as_shared("GET", "/projects/name/mine"), 404);
    still_user_on_other("off mine");
    assert_eq!(
        w.post_form("/ams-build/users/shared", &adm, &[("level:mine", "1")])
            .0,
        404
    );
    // The API tells the levels apart.
    let (st, me) = http(
        &w.addr,
        "GET",
        "/ams-build/api/user",
        &[("Authorization", format!("Bearer {token}"))],
        b"",
    );
    assert_eq!(st, 200);
    assert_eq!(me["levels"]["other"]["level_name"], "USER", "{me}");
    assert_eq!(me["projects"], json!(["other"]));
}

/// Creating an API token needs the current password, through the login throttle.
#[test]
fn a_token_needs_the_current_password() {
    let w = Web::new(json!({}));
    add_user(&w.h, "other", "3", "mine", PW);
    let tokens_of = |user: &str| {
        String::from_utf8_lossy(&w.h.cli(&["token", "list", "--user", user]).stdout).to_string()
    };
    let cookie = w.session("mod", PW);
    for (pairs, why) in [
        (vec![("label", "ci")], "no password"),
        (vec![("label", "ci"), ("current", "")], "empty"),
        (
            vec![("label", "ci"), ("current", "wrong password")],
            "wrong",
        ),
    ] {
        let (st, _, page) = w.post_form("/ams-build/account/tokens", &cookie, &pairs);
        assert_eq!(st, 403, "{why}: {page}");
        assert!(!page.contains("new-token"), "{why}");
        assert!(
            tokens_of("mod").trim().is_empty(),
            "{why}: a token was made"
        );
    }
    let (st, _, page) = w.post_form(
        "/ams-build/account/tokens",
        &cookie,
        &[("label", "ci"), ("current", PW)],
    );
    assert_eq!(st, 200);
    assert!(page.contains("new-token"));
    assert!(tokens_of("mod").contains("ci"));
    // Guessing through a session meets the login throttle: after five wrong passwords even
    // the right one is refused, and so is the login form.
    let theirs = w.session("other", PW);
    for _ in 0..5 {
        let (st, _, _) = w.post_form(
            "/ams-build/account/tokens",
            &theirs,
            &[("label", "x"), ("current", "a guess")],
        );
        assert_eq!(st, 403);
    }
    let (st, _, _) = w.post_form(
        "/ams-build/account/tokens",
        &theirs,
        &[("label", "x"), ("current", PW)],
    );
    assert_eq!(st, 429);
    assert_eq!(w.login("other", PW, "", None).0, 429);
    assert!(tokens_of("other").trim().is_empty());
}

/// A new password, however it is set, revokes the tokens made with the old one.
#[test]
fn api_tokens_end_with_the_password() {
    let w = Web::new(json!({}));
    add_user(&w.h, "root", "5", "", PW);
    let new_token = || {
        let o = w.h.cli(&["token", "create", "--user", "mod"]);
        assert!(o.status.success());
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    };
    let bearer = |t: &str| {
        http(
            &w.addr,
            "GET",
            "/ams-build/api/user",
            &[("Authorization", format!("Bearer {t}"))],
            b"",
        )
        .0
    };
    // `amsbuild user passwd`.
    let t = new_token();
    assert_eq!(bearer(&t), 200);
    set_password(&w.h, "mod", "second password");
    assert_eq!(bearer(&t), 401, "a token survived `user passwd`");
    // A SERVER ADMIN's reset from the Users page.
    let t = new_token();
    assert_eq!(bearer(&t), 200);
    let root = w.session("root", PW);
    let (st, _, _) = w.post_form(
        "/ams-build/users/mod/password",
        &root,
        &[("password", "third password")],
    );
    assert_eq!(st, 303);
    assert_eq!(bearer(&t), 401, "a token survived an admin's reset");
    // The user's own change, with tokens from the CLI and from the account page.
    let t = new_token();
    let cookie = w.session("mod", "third password");
    let (st, _, page) = w.post_form(
        "/ams-build/account/tokens",
        &cookie,
        &[("label", "web"), ("current", "third password")],
    );
    assert_eq!(st, 200);
    let tag = "<pre id=\"new-token\">";
    let i = page.find(tag).expect("the new token") + tag.len();
    let web = page[i..page[i..].find('<').unwrap() + i].to_string();
    assert_eq!((bearer(&t), bearer(&web)), (200, 200));
    let (st, _, _) = w.post_form(
        "/ams-build/account/password",
        &cookie,
        &[("current", "third password"), ("new", "fourth password")],
    );
    assert_eq!(st, 303);
    assert_eq!((bearer(&t), bearer(&web)), (401, 401));
    let list = w.h.cli(&["token", "list", "--user", "mod"]);
    assert!(String::from_utf8_lossy(&list.stdout).trim().is_empty());
}
