//! The endpoints the official SDKs' common calls use, answered in
//! QuickBlox's own shapes and with state: users (list, get, update,
//! delete), dialogs and messages (create, list with filters, update,
//! delete), custom objects (create, get, list with filters, sort, skip,
//! limit and count, update, delete) and files (with an upload URL on the
//! simulator standing in for S3). Kept in memory, bounded: the oldest of
//! each kind go first. Creations answer 200 (a file's, 201): the SDKs take
//! 200, 201 and 202 alike.
//!
//! What it does not implement it refuses: a path it does not know gets
//! 404, a known path with another method 405 (with `Allow`), a filter
//! operator it does not know 422, each in QuickBlox's error shape and
//! counted as `unimplemented` in `/_sim/stats`. It never answers 200 to
//! what it did not do.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{SystemTime, UNIX_EPOCH};

use http::{header, HeaderMap, Method, StatusCode};
use serde_json::{json, Map, Value};

use super::{SimConfig, SimUser};

/// Most items of each kind kept (the demo may run for a long time).
const MAX_ITEMS: usize = 1_000;

#[derive(Default)]
pub(super) struct Resources {
    next: u64,
    dialogs: VecDeque<Value>,
    messages: VecDeque<Value>,
    objects: HashMap<String, VecDeque<Value>>,
    blobs: VecDeque<Value>,
    /// Fields users changed (`PUT /users/{id}.json`), by user id.
    user_fields: HashMap<u64, Map<String, Value>>,
    /// Users deleted (`DELETE /users/{id}.json`).
    deleted_users: HashSet<u64>,
}

/// A request as the resource handlers see it.
pub(super) struct Call<'a> {
    pub method: &'a Method,
    pub path: &'a str,
    pub query: &'a str,
    pub headers: &'a HeaderMap,
    pub body: &'a [u8],
    pub user_id: u64,
    pub now: SystemTime,
    /// Where a new file's upload goes.
    pub uploads: UploadTo<'a>,
}

/// Where the upload URL of a new file points, as QuickBlox's answers do.
#[derive(Clone, Copy)]
pub(super) enum UploadTo<'a> {
    /// The API's own host, as the call reached it (`scheme://host`):
    /// `/blobs/{id}/upload/`, with the session's token.
    Api(&'a str),
    /// An S3 bucket on another host (the simulator's stand-in): a form
    /// POST to its root, without a token.
    S3(&'a str),
}

/// An answer: status and JSON body; `None` for a body-less answer.
pub(super) type Answered = (StatusCode, Option<Value>);

/// What the simulator makes of a call.
pub(super) enum Routed {
    Answered(Answered),
    /// No such endpoint.
    NotFound,
    /// A known endpoint, another method: the methods it takes.
    MethodNotAllowed(&'static [Method]),
    /// A known endpoint, but something in the call (a filter operator) the
    /// simulator does not implement.
    Unimplemented(String),
}

const GET: &[Method] = &[Method::GET, Method::HEAD];
const GET_POST: &[Method] = &[Method::GET, Method::HEAD, Method::POST];
// Rails routes PATCH with PUT to `update`, as QuickBlox's API does.
const PUT_DELETE: &[Method] = &[Method::PUT, Method::PATCH, Method::DELETE];
const GET_PUT_DELETE: &[Method] = &[
    Method::GET,
    Method::HEAD,
    Method::PUT,
    Method::PATCH,
    Method::DELETE,
];
const POST: &[Method] = &[Method::POST];
const PUT: &[Method] = &[Method::PUT];

impl Resources {
    /// Routes a call made with a session or an API key.
    pub(super) fn route(
        &mut self,
        config: &SimConfig,
        passwords: &mut HashMap<String, String>,
        call: &Call<'_>,
    ) -> Routed {
        let path = call.path.strip_suffix(".json").unwrap_or(call.path);
        let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        let allowed = match segments.as_slice() {
            ["users"] | ["users", "by_login"] | ["users", "by_email"] => GET,
            ["users", _] => GET_PUT_DELETE,
            ["chat", "Dialog"] | ["chat", "Message"] | ["data", _] => GET_POST,
            ["chat", "Dialog", _] | ["chat", "Message", _] => PUT_DELETE,
            ["data", _, _] => GET_PUT_DELETE,
            ["blobs"] => POST,
            ["blobs", _] => GET,
            ["blobs", _, "complete"] => PUT,
            ["blobs", _, "upload"] | ["blobs", _, "upload", ""] => POST,
            _ => return Routed::NotFound,
        };
        if !allowed.contains(call.method) {
            return Routed::MethodNotAllowed(allowed);
        }
        // HEAD is GET without the body (hyper leaves the body out); PATCH
        // is PUT where both are routed.
        let method = match *call.method {
            Method::HEAD => &Method::GET,
            Method::PATCH => &Method::PUT,
            _ => call.method,
        };
        let answered = match (method, segments.as_slice()) {
            (&Method::GET, ["users"]) => self.users(config, call),
            (&Method::GET, ["users", "by_login"]) => {
                let login = params(call)["login"].as_str().map(str::to_owned);
                self.one_user(config, call, |u| Some(u.login.as_str()) == login.as_deref())
            }
            (&Method::GET, ["users", "by_email"]) => {
                let email = params(call)["email"].as_str().map(str::to_owned);
                self.one_user(config, call, |u| Some(u.email.as_str()) == email.as_deref())
            }
            (&Method::GET, ["users", id]) => {
                let id = id.parse::<u64>().ok();
                self.one_user(config, call, |u| Some(u.id) == id)
            }
            (&Method::PUT, ["users", id]) => return self.update_user(config, passwords, id, call),
            (&Method::DELETE, ["users", id]) => self.delete_user(config, id, call),
            (&Method::POST, ["chat", "Dialog"]) => self.create_dialog(config, call),
            (&Method::GET, ["chat", "Dialog"]) => {
                let mine = self.dialogs.iter().filter(|d| is_occupant(d, call.user_id));
                return list(
                    mine,
                    call,
                    |items, total, skip, limit| json!({"total_entries": total, "skip": skip, "limit": limit, "items": items}),
                );
            }
            (&Method::PUT, ["chat", "Dialog", id]) => return self.update_dialog(id, call),
            (&Method::DELETE, ["chat", "Dialog", ids]) => {
                let user = call.user_id;
                delete(&mut self.dialogs, ids, "Dialog", |d| is_occupant(d, user))
            }
            (&Method::POST, ["chat", "Message"]) => self.create_message(call),
            (&Method::GET, ["chat", "Message"]) => {
                let p = params(call);
                let Some(dialog) = p["chat_dialog_id"].as_str() else {
                    return Routed::Answered(unprocessable("chat_dialog_id is required"));
                };
                let readable = self
                    .dialogs
                    .iter()
                    .any(|d| d["_id"] == dialog && is_occupant(d, call.user_id));
                if !readable {
                    return Routed::Answered(not_found("Dialog not found"));
                }
                let items = self
                    .messages
                    .iter()
                    .filter(|m| m["chat_dialog_id"] == dialog);
                return list(
                    items,
                    call,
                    |items, _, skip, limit| json!({"skip": skip, "limit": limit, "items": items}),
                );
            }
            (&Method::PUT, ["chat", "Message", id]) => return self.update_message(id, call),
            (&Method::DELETE, ["chat", "Message", ids]) => {
                let user = call.user_id;
                delete(&mut self.messages, ids, "Message", |m| {
                    m["sender_id"] == user
                })
            }
            (&Method::POST, ["data", class]) => self.create_object(class, call),
            (&Method::GET, ["data", class]) => {
                let class = (*class).to_owned();
                let items = self.objects.get(&class).into_iter().flatten();
                return list(
                    items,
                    call,
                    |items, _, skip, limit| json!({"class_name": class, "skip": skip, "limit": limit, "items": items}),
                );
            }
            (&Method::GET, ["data", class, ids]) => {
                let wanted: Vec<&str> = ids.split(',').collect();
                let items: Vec<&Value> = self
                    .objects
                    .get(*class)
                    .into_iter()
                    .flatten()
                    .filter(|o| o["_id"].as_str().is_some_and(|id| wanted.contains(&id)))
                    .collect();
                (
                    StatusCode::OK,
                    Some(json!({"class_name": class, "skip": 0, "limit": 100, "items": items})),
                )
            }
            (&Method::PUT, ["data", class, id]) => return self.update_object(class, id, call),
            (&Method::DELETE, ["data", class, ids]) => {
                let user = call.user_id;
                let kept = self.objects.entry((*class).to_owned()).or_default();
                delete(kept, ids, "Object", |o| o["user_id"] == user)
            }
            (&Method::POST, ["blobs"]) => self.create_blob(config, call),
            (&Method::PUT, ["blobs", id, "complete"]) => self.complete_blob(id, call),
            (&Method::GET, ["blobs", id]) => self.get_blob(id),
            (&Method::POST, ["blobs", id, "upload", ..]) => self.upload_on_api(id, call),
            _ => return Routed::MethodNotAllowed(allowed),
        };
        Routed::Answered(answered)
    }

    /// `POST /blobs/{id}/upload/` on the API's host: the file, as a form
    /// whose `key` field names the blob (the SDKs copy the upload URL's
    /// query into fields), made with a session whose user may write.
    /// Recorded on the blob: its size and who uploaded it.
    fn upload_on_api(&mut self, id: &str, call: &Call<'_>) -> Answered {
        let key = form_field(call.body, "key");
        let user = call.user_id;
        let Some(blob) = self.blob(id) else {
            return not_found("Blob not found");
        };
        if key.as_deref() != blob["uid"].as_str() {
            return (
                StatusCode::FORBIDDEN,
                Some(json!({"errors": {"base": ["The upload's key is not this file's"]}})),
            );
        }
        blob["uploaded_bytes"] = json!(form_file_len(call.body).unwrap_or(call.body.len()));
        blob["uploaded_by"] = json!(user);
        (StatusCode::CREATED, None)
    }

    /// `POST /` on the S3 stand-in: S3's form upload, no token.
    /// The blob's key comes as S3 takes it: a field of the multipart form
    /// (the SDKs copy the URL's query into fields), or in the query.
    pub(super) fn upload(&mut self, query: &str, body: &[u8]) -> (StatusCode, String) {
        let key: String = form_urlencoded::parse(query.as_bytes())
            .find(|(k, _)| k == "key")
            .map(|(_, v)| v.into_owned())
            .or_else(|| form_field(body, "key"))
            .unwrap_or_default();
        let found = self.blobs.iter_mut().find(|b| b["uid"] == key.as_str());
        match found {
            Some(blob) => {
                blob["uploaded_bytes"] = json!(form_file_len(body).unwrap_or(body.len()));
                (
                    StatusCode::CREATED,
                    format!(
                        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<PostResponse><Bucket>sim</Bucket><Key>{key}</Key></PostResponse>"
                    ),
                )
            }
            None => (
                StatusCode::FORBIDDEN,
                "<Error><Code>AccessDenied</Code></Error>".to_owned(),
            ),
        }
    }

    fn id(&mut self, now: SystemTime) -> String {
        self.next += 1;
        format!("{:08x}{:016x}", unix(now), self.next)
    }

    fn create_dialog(&mut self, config: &SimConfig, call: &Call<'_>) -> Answered {
        let p = params(call);
        let kind = number(&p["type"]).unwrap_or(2);
        let mut occupants: Vec<u64> = match &p["occupants_ids"] {
            Value::Array(ids) => ids.iter().filter_map(number).collect(),
            Value::String(s) => s.split(',').filter_map(|x| x.trim().parse().ok()).collect(),
            other => number(other).into_iter().collect(),
        };
        if !occupants.contains(&call.user_id) {
            occupants.insert(0, call.user_id);
        }
        let id = self.id(call.now);
        let at = rfc3339(call.now);
        let dialog = json!({
            "_id": id,
            "created_at": at,
            "last_message": null,
            "last_message_date_sent": null,
            "last_message_id": null,
            "last_message_user_id": null,
            "name": p["name"].as_str().unwrap_or(""),
            "occupants_ids": occupants,
            "photo": null,
            "type": kind,
            "updated_at": at,
            "user_id": call.user_id,
            "xmpp_room_jid": if kind == 3 { Value::Null } else {
                json!(format!("{}_{id}@muc.chat.quickblox.com", config.application_id))
            },
            "unread_messages_count": 0,
        });
        push(&mut self.dialogs, dialog.clone());
        (StatusCode::OK, Some(dialog))
    }

    fn create_message(&mut self, call: &Call<'_>) -> Answered {
        let p = params(call);
        let dialog_id = p["chat_dialog_id"].as_str().unwrap_or("").to_owned();
        let text = p["message"].as_str().unwrap_or("").to_owned();
        // Lenient where QuickBlox is not: a message to a dialog the
        // simulator does not know is still taken.
        if let Some(dialog) = self
            .dialogs
            .iter_mut()
            .find(|d| d["_id"] == dialog_id.as_str())
        {
            dialog["last_message"] = json!(text);
            dialog["last_message_date_sent"] = json!(unix(call.now));
            dialog["last_message_user_id"] = json!(call.user_id);
        }
        let id = self.id(call.now);
        let at = rfc3339(call.now);
        let message = json!({
            "_id": id,
            "attachments": [],
            "chat_dialog_id": dialog_id,
            "created_at": at,
            "date_sent": unix(call.now),
            "delivered_ids": [call.user_id],
            "message": text,
            "read_ids": [call.user_id],
            "recipient_id": number(&p["recipient_id"]).unwrap_or(0),
            "sender_id": call.user_id,
            "updated_at": at,
            "read": 0,
        });
        push(&mut self.messages, message.clone());
        (StatusCode::OK, Some(message))
    }

    fn create_object(&mut self, class: &str, call: &Call<'_>) -> Answered {
        let mut object = match params(call) {
            Value::Object(fields) => fields,
            _ => Map::new(),
        };
        object.insert("_id".into(), json!(self.id(call.now)));
        object.insert("_parent_id".into(), Value::Null);
        object.insert("created_at".into(), json!(unix(call.now)));
        object.insert("updated_at".into(), json!(unix(call.now)));
        object.insert("user_id".into(), json!(call.user_id));
        let object = Value::Object(object);
        let kept = self.objects.entry(class.to_owned()).or_default();
        push(kept, object.clone());
        (StatusCode::OK, Some(object))
    }

    fn create_blob(&mut self, config: &SimConfig, call: &Call<'_>) -> Answered {
        let p = params(call);
        let b = &p["blob"];
        self.next += 1;
        let id = self.next;
        let uid = format!(
            "{:032x}",
            (u128::from(unix(call.now)) << 64) | u128::from(id)
        );
        let at = rfc3339(call.now);
        let content_type = b["content_type"]
            .as_str()
            .unwrap_or("application/octet-stream");
        let content_type_q =
            percent_encoding::utf8_percent_encode(content_type, percent_encoding::NON_ALPHANUMERIC);
        let expires = unix(call.now) + 3600;
        // The query becomes the upload form's fields (the SDKs copy it).
        let upload = match call.uploads {
            UploadTo::Api(origin) => format!(
                "{origin}/blobs/{id}/upload/?Content-Type={content_type_q}&Expires={expires}\
                 &acl=authenticated-read&key={uid}&policy=c2lt&success_action_status=201\
                 &x-amz-algorithm=AWS4-HMAC-SHA256&x-amz-credential=sim%2F20261201%2Fus-east-1%2Fs3%2Faws4_request\
                 &x-amz-date=20261201T000000Z&x-amz-signature=00"
            ),
            UploadTo::S3(bucket) => format!(
                "{bucket}/?Content-Type={content_type_q}&Expires={expires}\
                 &acl=authenticated-read&key={uid}&success_action_status=201"
            ),
        };
        let blob = json!({
            "id": id,
            "uid": uid,
            "content_type": content_type,
            "name": b["name"].as_str().unwrap_or(""),
            "size": null,
            "created_at": at,
            "updated_at": at,
            "blob_status": null,
            "set_completed_at": null,
            "public": b["public"].as_str() == Some("true") || b["public"] == json!(true),
            "account_id": 1,
            "app_id": config.application_id.parse::<u64>().unwrap_or(0),
            "blob_object_access": {
                "id": id,
                "blob_id": id,
                "expires": rfc3339(call.now + std::time::Duration::from_secs(3600)),
                "object_access_type": "Write",
                "params": upload,
            },
        });
        push(&mut self.blobs, blob.clone());
        (StatusCode::CREATED, Some(json!({ "blob": blob })))
    }

    fn complete_blob(&mut self, id: &str, call: &Call<'_>) -> Answered {
        let p = params(call);
        let size = number(&p["size"]).or_else(|| number(&p["blob"]["size"]));
        let Some(blob) = self.blob(id) else {
            return not_found("Blob not found");
        };
        blob["size"] = json!(size);
        blob["blob_status"] = json!("complete");
        blob["set_completed_at"] = json!(rfc3339(call.now));
        // QuickBlox answers this one with an empty body.
        (StatusCode::OK, None)
    }

    fn get_blob(&mut self, id: &str) -> Answered {
        match self.blob(id) {
            Some(blob) => {
                let mut blob = blob.clone();
                if let Value::Object(fields) = &mut blob {
                    fields.remove("blob_object_access");
                }
                (StatusCode::OK, Some(json!({ "blob": blob })))
            }
            None => not_found("Blob not found"),
        }
    }

    fn blob(&mut self, id: &str) -> Option<&mut Value> {
        let id: u64 = id.parse().ok()?;
        self.blobs.iter_mut().find(|b| b["id"] == id)
    }
}

impl Resources {
    fn users(&self, config: &SimConfig, call: &Call<'_>) -> Answered {
        let p = params(call);
        let page = number(&p["page"]).unwrap_or(1).max(1);
        let per_page = number(&p["per_page"]).unwrap_or(10).clamp(1, 100);
        let live: Vec<&SimUser> = config
            .users
            .iter()
            .filter(|u| !self.deleted_users.contains(&u.id))
            .collect();
        let items: Vec<Value> = live
            .iter()
            .skip(((page - 1) * per_page) as usize)
            .take(per_page as usize)
            .map(|u| json!({ "user": self.user_json(u, call.now) }))
            .collect();
        (
            StatusCode::OK,
            Some(json!({
                "current_page": page,
                "per_page": per_page,
                "total_entries": live.len(),
                "items": items,
            })),
        )
    }

    fn one_user(
        &self,
        config: &SimConfig,
        call: &Call<'_>,
        which: impl Fn(&SimUser) -> bool,
    ) -> Answered {
        match config
            .users
            .iter()
            .find(|u| which(u) && !self.deleted_users.contains(&u.id))
        {
            Some(u) => (
                StatusCode::OK,
                Some(json!({ "user": self.user_json(u, call.now) })),
            ),
            None => not_found("User not found"),
        }
    }

    /// `PUT /users/{id}.json` with `{"user": {...}}`: a user changes their
    /// own profile, and their password with `old_password`.
    fn update_user(
        &mut self,
        config: &SimConfig,
        passwords: &mut HashMap<String, String>,
        id: &str,
        call: &Call<'_>,
    ) -> Routed {
        let Some(user) = self.live_user(config, id) else {
            return Routed::Answered(not_found("User not found"));
        };
        if user.id != call.user_id {
            return Routed::Answered(forbidden());
        }
        let p = params(call);
        let Value::Object(fields) = &p["user"] else {
            return Routed::Answered(unprocessable("user is required"));
        };
        let mut changed = Map::new();
        for (name, value) in fields {
            match name.as_str() {
                "full_name" | "phone" | "website" | "custom_data" | "external_user_id"
                | "blob_id" | "facebook_id" => {
                    changed.insert(name.clone(), value.clone());
                }
                "tag_list" => {
                    changed.insert("user_tags".into(), value.clone());
                }
                "password" | "old_password" => {}
                other => {
                    return Routed::Unimplemented(format!(
                        "changing a user's {other:?} is not implemented"
                    ))
                }
            }
        }
        if let Some(new) = fields.get("password").and_then(Value::as_str) {
            let current = passwords.get(&user.login).unwrap_or(&user.password);
            if fields.get("old_password").and_then(Value::as_str) != Some(current.as_str()) {
                return Routed::Answered(unprocessable("old_password is wrong"));
            }
            passwords.insert(user.login.clone(), new.to_owned());
        }
        let user = user.clone();
        self.user_fields.entry(user.id).or_default().extend(changed);
        Routed::Answered((
            StatusCode::OK,
            Some(json!({ "user": self.user_json(&user, call.now) })),
        ))
    }

    /// `DELETE /users/{id}.json`: a user deletes themself; from then on
    /// they are not found and cannot log in.
    fn delete_user(&mut self, config: &SimConfig, id: &str, call: &Call<'_>) -> Answered {
        let Some(user) = self.live_user(config, id) else {
            return not_found("User not found");
        };
        if user.id != call.user_id {
            return forbidden();
        }
        self.deleted_users.insert(user.id);
        (StatusCode::OK, None)
    }

    fn live_user<'c>(&self, config: &'c SimConfig, id: &str) -> Option<&'c SimUser> {
        let id: u64 = id.parse().ok()?;
        config
            .users
            .iter()
            .find(|u| u.id == id && !self.deleted_users.contains(&u.id))
    }

    /// `{"user": {...}}` for `POST /login.json`.
    pub(super) fn user_answer(&self, user: Option<&SimUser>, now: SystemTime) -> String {
        user.map_or(Value::Null, |u| json!({ "user": self.user_json(u, now) }))
            .to_string()
    }

    /// The users deleted (who cannot log in any more).
    pub(super) fn deleted_users(&self) -> HashSet<u64> {
        self.deleted_users.clone()
    }

    fn user_json(&self, u: &SimUser, now: SystemTime) -> Value {
        let at = rfc3339(now);
        let mut user = json!({
            "id": u.id,
            "full_name": u.login,
            "email": u.email,
            "login": u.login,
            "phone": null,
            "website": null,
            "created_at": at,
            "updated_at": at,
            "last_request_at": at,
            "external_user_id": null,
            "facebook_id": null,
            "blob_id": null,
            "custom_data": null,
            "age_over16": false,
            "parents_contacts": "",
            "user_tags": null,
        });
        if let (Value::Object(fields), Some(changed)) = (&mut user, self.user_fields.get(&u.id)) {
            fields.extend(changed.clone());
        }
        user
    }

    /// `PUT /chat/Dialog/{id}.json`: the name, the photo, and occupants
    /// added (`push_all[occupants_ids][]`) or removed (`pull_all`).
    fn update_dialog(&mut self, id: &str, call: &Call<'_>) -> Routed {
        let p = params(call);
        let user = call.user_id;
        let Some(dialog) = self.dialogs.iter_mut().find(|d| d["_id"] == id) else {
            return Routed::Answered(not_found("Dialog not found"));
        };
        if !is_occupant(dialog, user) {
            return Routed::Answered(forbidden());
        }
        let Value::Object(fields) = &p else {
            return Routed::Answered(unprocessable("nothing to update"));
        };
        for (name, value) in fields {
            match name.as_str() {
                "name" | "photo" | "data" => dialog[name.as_str()] = value.clone(),
                "push_all" | "pull_all" => {
                    let ids: Vec<u64> = match &value["occupants_ids"] {
                        Value::Array(ids) => ids.iter().filter_map(number).collect(),
                        other => number(other).into_iter().collect(),
                    };
                    if let Value::Array(occupants) = &mut dialog["occupants_ids"] {
                        if name == "push_all" {
                            for id in ids {
                                if !occupants.contains(&json!(id)) {
                                    occupants.push(json!(id));
                                }
                            }
                        } else {
                            occupants.retain(|o| !number(o).is_some_and(|o| ids.contains(&o)));
                        }
                    }
                }
                other => {
                    return Routed::Unimplemented(format!(
                        "updating a dialog's {other:?} is not implemented"
                    ))
                }
            }
        }
        dialog["updated_at"] = json!(rfc3339(call.now));
        Routed::Answered((StatusCode::OK, Some(dialog.clone())))
    }

    /// `PUT /chat/Message/{id}.json`: the sender edits the text, or an
    /// occupant marks it read (`read=1`). QuickBlox answers with no body.
    fn update_message(&mut self, id: &str, call: &Call<'_>) -> Routed {
        let p = params(call);
        let user = call.user_id;
        let Some(message) = self.messages.iter_mut().find(|m| m["_id"] == id) else {
            return Routed::Answered(not_found("Message not found"));
        };
        let Value::Object(fields) = &p else {
            return Routed::Answered(unprocessable("nothing to update"));
        };
        for (name, value) in fields {
            match name.as_str() {
                "message" if message["sender_id"] == user => {
                    message["message"] = value.clone();
                }
                "message" => return Routed::Answered(forbidden()),
                "read" if number(value) == Some(1) => {
                    if let Value::Array(ids) = &mut message["read_ids"] {
                        if !ids.contains(&json!(user)) {
                            ids.push(json!(user));
                        }
                    }
                }
                "chat_dialog_id" => {}
                other => {
                    return Routed::Unimplemented(format!(
                        "updating a message's {other:?} is not implemented"
                    ))
                }
            }
        }
        message["updated_at"] = json!(rfc3339(call.now));
        Routed::Answered((StatusCode::OK, None))
    }

    /// `PUT /data/{class}/{id}.json`: the owner sets fields; answers the
    /// record.
    fn update_object(&mut self, class: &str, id: &str, call: &Call<'_>) -> Routed {
        let p = params(call);
        let user = call.user_id;
        let Some(object) = self
            .objects
            .get_mut(class)
            .and_then(|kept| kept.iter_mut().find(|o| o["_id"] == id))
        else {
            return Routed::Answered(not_found("Object not found"));
        };
        if object["user_id"] != user {
            return Routed::Answered(forbidden());
        }
        let Value::Object(fields) = p else {
            return Routed::Answered(unprocessable("nothing to update"));
        };
        for (name, value) in fields {
            if name.starts_with('_')
                || matches!(name.as_str(), "user_id" | "created_at" | "updated_at")
            {
                continue;
            }
            if matches!(value, Value::Object(_)) {
                // `inc`, `push`, `pull` and the other update operators.
                return Routed::Unimplemented(format!(
                    "the update operator in {name:?} is not implemented"
                ));
            }
            object[name.as_str()] = value;
        }
        object["updated_at"] = json!(unix(call.now));
        Routed::Answered((StatusCode::OK, Some(object.clone())))
    }
}

fn is_occupant(dialog: &Value, user: u64) -> bool {
    dialog["occupants_ids"]
        .as_array()
        .is_some_and(|ids| ids.contains(&json!(user)))
}

/// Deletes the records among `ids` (comma-separated) that `mine` allows.
/// One id: 200 with no body, or 404 / 403. Several: QuickBlox's summary.
fn delete(
    items: &mut VecDeque<Value>,
    ids: &str,
    what: &str,
    mine: impl Fn(&Value) -> bool,
) -> Answered {
    let ids: Vec<&str> = ids.split(',').filter(|i| !i.is_empty()).collect();
    let (mut deleted, mut missing, mut refused) = (Vec::new(), Vec::new(), Vec::new());
    for id in &ids {
        match items.iter().position(|r| r["_id"] == *id) {
            None => missing.push(*id),
            Some(at) if !mine(&items[at]) => refused.push(*id),
            Some(at) => {
                items.remove(at);
                deleted.push(*id);
            }
        }
    }
    match (ids.len(), deleted.is_empty(), refused.is_empty()) {
        (1, false, _) => (StatusCode::OK, None),
        (1, true, true) => not_found(&format!("{what} not found")),
        (1, true, false) => forbidden(),
        _ => (
            StatusCode::OK,
            Some(json!({
                "SuccessfullyDeleted": { "ids": deleted },
                "NotFound": { "ids": missing },
                "WrongPermissions": { "ids": refused },
            })),
        ),
    }
}

/// A list answer: the records that pass the call's filters, sorted,
/// skipped and limited, or their count (`count=1`); `shape` wraps the page
/// (`items`, the total before skip and limit, skip, limit).
fn list<'v>(
    records: impl Iterator<Item = &'v Value>,
    call: &Call<'_>,
    shape: impl FnOnce(Vec<Value>, usize, usize, usize) -> Value,
) -> Routed {
    let p = params(call);
    let query = match Query::read(&p) {
        Ok(q) => q,
        Err(unimplemented) => return Routed::Unimplemented(unimplemented),
    };
    let mut kept: Vec<&Value> = records.filter(|r| query.keeps(r)).collect();
    if query.count {
        return Routed::Answered((StatusCode::OK, Some(json!({ "items_count": kept.len() }))));
    }
    if let Some((field, ascending)) = &query.sort {
        kept.sort_by(|a, b| {
            let order = compare(&a[field.as_str()], &b[field.as_str()]);
            if *ascending {
                order
            } else {
                order.reverse()
            }
        });
    }
    let total = kept.len();
    let items = kept
        .into_iter()
        .skip(query.skip)
        .take(query.limit)
        .cloned()
        .collect();
    Routed::Answered((
        StatusCode::OK,
        Some(shape(items, total, query.skip, query.limit)),
    ))
}

/// A list call's filters (`field=value`, `field[op]=value` for `gt lt gte
/// lte ne in nin`), `sort_asc`/`sort_desc`, `skip`, `limit` (100 by
/// default, 1,000 at most, as QuickBlox) and `count`.
struct Query {
    filters: Vec<(String, Op, String)>,
    sort: Option<(String, bool)>,
    skip: usize,
    limit: usize,
    count: bool,
}

#[derive(Clone, Copy)]
enum Op {
    Eq,
    Gt,
    Lt,
    Gte,
    Lte,
    Ne,
    In,
    Nin,
}

/// Parameters of a list call that are not filters.
const NOT_FILTERS: &[&str] = &[
    "skip",
    "limit",
    "sort_asc",
    "sort_desc",
    "count",
    "page",
    "per_page",
    "token",
];

impl Query {
    fn read(p: &Value) -> Result<Query, String> {
        let mut query = Query {
            filters: Vec::new(),
            sort: None,
            skip: number(&p["skip"]).unwrap_or(0) as usize,
            limit: number(&p["limit"]).unwrap_or(100).clamp(1, 1000) as usize,
            count: number(&p["count"]) == Some(1),
        };
        if let Some(field) = p["sort_asc"].as_str() {
            query.sort = Some((field.to_owned(), true));
        }
        if let Some(field) = p["sort_desc"].as_str() {
            query.sort = Some((field.to_owned(), false));
        }
        let Value::Object(fields) = p else {
            return Ok(query);
        };
        for (name, value) in fields {
            if NOT_FILTERS.contains(&name.as_str()) {
                continue;
            }
            match value {
                Value::Object(ops) => {
                    for (op, operand) in ops {
                        let op = match op.as_str() {
                            "gt" => Op::Gt,
                            "lt" => Op::Lt,
                            "gte" => Op::Gte,
                            "lte" => Op::Lte,
                            "ne" => Op::Ne,
                            "in" => Op::In,
                            "nin" => Op::Nin,
                            other => {
                                return Err(format!(
                                    "the filter operator {other:?} (on {name:?}) is not implemented"
                                ))
                            }
                        };
                        query.filters.push((name.clone(), op, scalar(operand)));
                    }
                }
                other => query.filters.push((name.clone(), Op::Eq, scalar(other))),
            }
        }
        Ok(query)
    }

    fn keeps(&self, record: &Value) -> bool {
        self.filters.iter().all(|(field, op, operand)| {
            let value = &record[field.as_str()];
            let listed = || {
                operand
                    .split(',')
                    .any(|o| compare(value, &json!(o)).is_eq())
            };
            let order = || compare(value, &json!(operand));
            match op {
                Op::Eq => !value.is_null() && order().is_eq(),
                Op::Ne => !order().is_eq(),
                Op::Gt => !value.is_null() && order().is_gt(),
                Op::Lt => !value.is_null() && order().is_lt(),
                Op::Gte => !value.is_null() && order().is_ge(),
                Op::Lte => !value.is_null() && order().is_le(),
                Op::In => listed(),
                Op::Nin => !listed(),
            }
        })
    }
}

/// A parameter's text (forms send only text; JSON may send numbers).
fn scalar(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Compares a record's value with another: as numbers when both read as
/// numbers, else as text.
fn compare(a: &Value, b: &Value) -> std::cmp::Ordering {
    let num = |v: &Value| {
        v.as_f64()
            .or_else(|| v.as_str()?.trim().parse::<f64>().ok())
    };
    match (num(a), num(b)) {
        (Some(x), Some(y)) => x.partial_cmp(&y).unwrap_or(std::cmp::Ordering::Equal),
        _ => scalar(a).cmp(&scalar(b)),
    }
}

fn forbidden() -> Answered {
    (
        StatusCode::FORBIDDEN,
        Some(
            json!({ "errors": { "base": ["You don't have appropriate permissions to perform this operation"] } }),
        ),
    )
}

fn unprocessable(what: &str) -> Answered {
    (
        StatusCode::UNPROCESSABLE_ENTITY,
        Some(json!({ "errors": { "base": [what] } })),
    )
}

/// QuickBlox's not-found answer.
fn not_found(what: &str) -> Answered {
    (
        StatusCode::NOT_FOUND,
        Some(json!({ "errors": { "base": [what] } })),
    )
}

fn push(items: &mut VecDeque<Value>, item: Value) {
    if items.len() == MAX_ITEMS {
        items.pop_front();
    }
    items.push_back(item);
}

/// The call's parameters as one JSON object: the query for GET, else the
/// body, JSON or a form (`a[b]=` nests, `a[]=` makes a list).
pub(super) fn params(call: &Call<'_>) -> Value {
    let is_json = call
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if call.method != Method::GET && is_json {
        return match serde_json::from_slice(call.body) {
            Ok(Value::Object(map)) => Value::Object(map),
            _ => Value::Object(Map::new()),
        };
    }
    let source = if call.method == Method::GET {
        call.query.as_bytes()
    } else {
        call.body
    };
    let mut out = Map::new();
    for (k, v) in form_urlencoded::parse(source) {
        match k.split_once('[') {
            Some((name, rest)) => {
                let field = rest.trim_end_matches(']');
                let slot = out.entry(name.to_owned());
                if field.is_empty() {
                    let list = slot.or_insert_with(|| json!([]));
                    if let Value::Array(items) = list {
                        items.push(json!(v));
                    }
                } else {
                    let nested = slot.or_insert_with(|| json!({}));
                    if let Value::Object(fields) = nested {
                        fields.insert(field.to_owned(), json!(v));
                    }
                }
            }
            None => {
                out.insert(k.into_owned(), json!(v));
            }
        }
    }
    Value::Object(out)
}

/// A plain field of a multipart form: what follows `name="NAME"` and the
/// blank line, up to the line's end. Enough for the fields S3 forms carry.
fn form_field(body: &[u8], name: &str) -> Option<String> {
    let marker = format!("name=\"{name}\"");
    let at = body
        .windows(marker.len())
        .position(|w| w == marker.as_bytes())?;
    let rest = &body[at + marker.len()..];
    let start = rest.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let value = &rest[start..];
    let end = value.windows(2).position(|w| w == b"\r\n")?;
    String::from_utf8(value[..end].to_vec()).ok()
}

/// The length of a multipart form's file: the part with a `filename`,
/// up to the boundary that ends it.
fn form_file_len(body: &[u8]) -> Option<usize> {
    let boundary_end = body.windows(2).position(|w| w == b"\r\n")?;
    let boundary = [b"\r\n", &body[..boundary_end]].concat();
    let at = body.windows(10).position(|w| w == b"filename=\"")?;
    let rest = &body[at..];
    let start = rest.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let content = &rest[start..];
    content
        .windows(boundary.len())
        .position(|w| w == boundary.as_slice())
}

/// A number, sent as one or as a string (forms send only strings).
fn number(v: &Value) -> Option<u64> {
    v.as_u64().or_else(|| v.as_str()?.trim().parse().ok())
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// `2019-09-01T14:55:56Z`, whole seconds, as QuickBlox writes times.
fn rfc3339(t: SystemTime) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix(t) as i64)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}
