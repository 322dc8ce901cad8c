//! The common endpoints, answered in QuickBlox's own shapes so that SDK
//! helpers that read fields work: users, dialogs, messages, custom objects
//! and files (with an upload URL on the simulator standing in for S3).
//! Kept in memory, bounded: the oldest of each kind go first. Creations
//! answer 200 (a file's, 201): the SDKs take 200, 201 and 202 alike.

use std::collections::{HashMap, VecDeque};
use std::time::{SystemTime, UNIX_EPOCH};

use http::{header, HeaderMap, Method, StatusCode};
use serde_json::{json, Map, Value};

use super::SimConfig;

/// Most items of each kind kept (the demo may run for a long time).
const MAX_ITEMS: usize = 1_000;

#[derive(Default)]
pub(super) struct Resources {
    next: u64,
    dialogs: VecDeque<Value>,
    messages: VecDeque<Value>,
    objects: HashMap<String, VecDeque<Value>>,
    blobs: VecDeque<Value>,
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
    /// Where uploads go (the simulator's own URL).
    pub sim_url: &'a str,
}

/// An answer: status and JSON body; `None` for a body-less answer.
pub(super) type Answered = (StatusCode, Option<Value>);

impl Resources {
    /// The answer for a known endpoint, or `None` (the caller echoes).
    pub(super) fn answer(&mut self, config: &SimConfig, call: &Call<'_>) -> Option<Answered> {
        let path = call.path.strip_suffix(".json")?;
        let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        let get = call.method == Method::GET;
        let post = call.method == Method::POST;
        match segments.as_slice() {
            ["users"] if get => Some(users(config, call)),
            ["users", "by_login"] if get => {
                let login = params(call)["login"].as_str().map(str::to_owned);
                Some(one_user(config, call, |u| {
                    Some(u.login.as_str()) == login.as_deref()
                }))
            }
            ["users", id] if get => {
                let id = id.parse::<u64>().ok();
                Some(one_user(config, call, |u| Some(u.id) == id))
            }
            ["chat", "Dialog"] if post => Some(self.create_dialog(config, call)),
            ["chat", "Dialog"] if get => Some(self.list_dialogs(call)),
            ["chat", "Message"] if post => Some(self.create_message(call)),
            ["chat", "Message"] if get => Some(self.list_messages(call)),
            ["data", class] if post => Some(self.create_object(class, call)),
            ["data", class] if get => Some(self.list_objects(class)),
            ["blobs"] if post => Some(self.create_blob(config, call)),
            ["blobs", id, "complete"] if call.method == Method::PUT => {
                Some(self.complete_blob(id, call))
            }
            ["blobs", id] if get => Some(self.get_blob(id)),
            _ => None,
        }
    }

    /// `POST /_sim/upload`: the stand-in for S3's form upload.
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
                blob["uploaded_bytes"] = json!(body.len());
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

    fn list_dialogs(&self, call: &Call<'_>) -> Answered {
        let mine: Vec<&Value> = self
            .dialogs
            .iter()
            .filter(|d| {
                d["occupants_ids"]
                    .as_array()
                    .is_some_and(|ids| ids.contains(&json!(call.user_id)))
            })
            .collect();
        (
            StatusCode::OK,
            Some(json!({"total_entries": mine.len(), "skip": 0, "limit": 100, "items": mine})),
        )
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

    fn list_messages(&self, call: &Call<'_>) -> Answered {
        let p = params(call);
        let dialog = p["chat_dialog_id"].as_str().unwrap_or("");
        let items: Vec<&Value> = self
            .messages
            .iter()
            .filter(|m| m["chat_dialog_id"] == dialog)
            .collect();
        (
            StatusCode::OK,
            Some(json!({"skip": 0, "limit": 100, "items": items})),
        )
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

    fn list_objects(&self, class: &str) -> Answered {
        let items: Vec<&Value> = self.objects.get(class).into_iter().flatten().collect();
        (
            StatusCode::OK,
            Some(json!({"class_name": class, "skip": 0, "limit": 100, "items": items})),
        )
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
        let upload = format!(
            "{}/_sim/upload?Content-Type={}&Expires={}&acl=authenticated-read&key={uid}&success_action_status=201",
            call.sim_url,
            percent_encoding::utf8_percent_encode(content_type, percent_encoding::NON_ALPHANUMERIC),
            unix(call.now) + 3600,
        );
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

fn users(config: &SimConfig, call: &Call<'_>) -> Answered {
    let p = params(call);
    let page = number(&p["page"]).unwrap_or(1).max(1);
    let per_page = number(&p["per_page"]).unwrap_or(10).clamp(1, 100);
    let items: Vec<Value> = config
        .users
        .iter()
        .skip(((page - 1) * per_page) as usize)
        .take(per_page as usize)
        .map(|u| json!({ "user": user_json(u, call.now) }))
        .collect();
    (
        StatusCode::OK,
        Some(json!({
            "current_page": page,
            "per_page": per_page,
            "total_entries": config.users.len(),
            "items": items,
        })),
    )
}

fn one_user(
    config: &SimConfig,
    call: &Call<'_>,
    which: impl Fn(&super::SimUser) -> bool,
) -> Answered {
    match config.users.iter().find(|u| which(u)) {
        Some(u) => (
            StatusCode::OK,
            Some(json!({ "user": user_json(u, call.now) })),
        ),
        None => not_found("User not found"),
    }
}

fn user_json(u: &super::SimUser, now: SystemTime) -> Value {
    let at = rfc3339(now);
    json!({
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
    })
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
