//! Checks request bodies against Cloud Hypervisor's OpenAPI document
//! (`spec/cloud-hypervisor-v53.0.openapi.yaml` in this crate: the official
//! v53.0 document, unchanged, under its Apache-2.0 license beside it).
//!
//! It understands the part of OpenAPI 3.0 that document uses: `$ref` to
//! `#/components/schemas/…`, `type` (object, array, string, integer,
//! number, boolean), `properties`, `required`, `additionalProperties`,
//! `items`, `enum`, `minimum`, `maximum`, and integer `format`s (int8 …
//! int64, uint8 … uint64) as ranges. One rule is stricter than OpenAPI: an
//! object property the schema does not list is an error unless the schema
//! says `additionalProperties`; the real server ignores unknown fields, so
//! a misspelt one would otherwise go unnoticed.

use serde_json::Value;
use std::path::{Path, PathBuf};

/// The document's file name, in this crate's `spec/` and in the project's
/// `shared/spec/` reference folder.
pub const SPEC_FILE: &str = "cloud-hypervisor-v53.0.openapi.yaml";

pub struct OpenApi {
    root: Value,
}

fn yaml_to_json(v: serde_yaml::Value) -> Value {
    match v {
        serde_yaml::Value::Null => Value::Null,
        serde_yaml::Value::Bool(b) => Value::Bool(b),
        serde_yaml::Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                Value::from(i)
            } else if let Some(u) = n.as_u64() {
                Value::from(u)
            } else {
                n.as_f64().map(Value::from).unwrap_or(Value::Null)
            }
        }
        serde_yaml::Value::String(s) => Value::String(s),
        serde_yaml::Value::Sequence(items) => Value::Array(items.into_iter().map(yaml_to_json).collect()),
        serde_yaml::Value::Mapping(map) => Value::Object(
            map.into_iter()
                .map(|(k, v)| {
                    // Response codes are YAML integers; JSON keys are strings.
                    let key = match k {
                        serde_yaml::Value::String(s) => s,
                        serde_yaml::Value::Number(n) => n.to_string(),
                        serde_yaml::Value::Bool(b) => b.to_string(),
                        other => format!("{other:?}"),
                    };
                    (key, yaml_to_json(v))
                })
                .collect(),
        ),
        serde_yaml::Value::Tagged(t) => yaml_to_json(t.value),
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn format_range(format: &str) -> Option<(i128, i128)> {
    Some(match format {
        "int8" => (i8::MIN.into(), i8::MAX.into()),
        "int16" => (i16::MIN.into(), i16::MAX.into()),
        "int32" => (i32::MIN.into(), i32::MAX.into()),
        "int64" => (i64::MIN.into(), i64::MAX.into()),
        "uint8" => (0, u8::MAX.into()),
        "uint16" => (0, u16::MAX.into()),
        "uint32" => (0, u32::MAX.into()),
        "uint64" => (0, u64::MAX.into()),
        _ => return None,
    })
}

fn as_i128(n: &serde_json::Number) -> Option<i128> {
    n.as_i64().map(i128::from).or_else(|| n.as_u64().map(i128::from))
}

impl OpenApi {
    pub fn parse(text: &str) -> Result<OpenApi, String> {
        let yaml: serde_yaml::Value = serde_yaml::from_str(text).map_err(|e| format!("not YAML: {e}"))?;
        let root = yaml_to_json(yaml);
        if root.pointer("/components/schemas").is_none() || root.get("paths").is_none() {
            return Err("not an OpenAPI document with paths and components.schemas".into());
        }
        let mut root = root;
        add_known_gaps(&mut root);
        Ok(OpenApi { root })
    }

    pub fn load(path: &Path) -> Result<OpenApi, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        OpenApi::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// The copy shipped with this crate.
    pub fn bundled() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("spec").join(SPEC_FILE)
    }

    /// The schema a request body of `method path` must match; `None` when
    /// the operation takes no body. An unknown operation is an error.
    pub fn request_schema(&self, path: &str, method: &str) -> Result<Option<&Value>, String> {
        let op = self
            .root
            .get("paths")
            .and_then(|p| p.get(path))
            .and_then(|p| p.get(method.to_ascii_lowercase()))
            .ok_or_else(|| format!("{method} {path} is not in the API"))?;
        Ok(op.pointer("/requestBody/content/application~1json/schema"))
    }

    /// Checks one request; every problem is listed.
    pub fn validate_request(&self, path: &str, method: &str, body: &[u8]) -> Result<(), Vec<String>> {
        let schema = self.request_schema(path, method).map_err(|e| vec![e])?;
        let Some(schema) = schema else {
            return if body.is_empty() { Ok(()) } else { Err(vec![format!("{method} {path} takes no body")]) };
        };
        let value: Value = serde_json::from_slice(body).map_err(|e| vec![format!("{method} {path}: body is not JSON: {e}")])?;
        self.validate_value(schema, &value)
    }

    /// Checks `value` against `schema` (which may be a `$ref`).
    pub fn validate_value(&self, schema: &Value, value: &Value) -> Result<(), Vec<String>> {
        let mut errors = Vec::new();
        self.check(schema, value, "$", &mut errors);
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }

    /// The schema named `name` in `components.schemas`.
    pub fn schema(&self, name: &str) -> Option<&Value> {
        self.root.pointer(&format!("/components/schemas/{name}"))
    }

    fn resolve<'a>(&'a self, schema: &'a Value, at: &str, errors: &mut Vec<String>) -> Option<&'a Value> {
        let mut schema = schema;
        for _ in 0..32 {
            let Some(reference) = schema.get("$ref") else { return Some(schema) };
            let Some(target) = reference.as_str().and_then(|r| r.strip_prefix('#')).and_then(|p| self.root.pointer(p)) else {
                errors.push(format!("{at}: unresolvable $ref {reference}"));
                return None;
            };
            schema = target;
        }
        errors.push(format!("{at}: $ref chain too deep"));
        None
    }

    fn check(&self, schema: &Value, value: &Value, at: &str, errors: &mut Vec<String>) {
        let Some(schema) = self.resolve(schema, at, errors) else { return };
        if let Some(options) = schema.get("enum").and_then(Value::as_array) {
            if !options.contains(value) {
                errors.push(format!("{at}: {value} is not one of {}", Value::Array(options.clone())));
            }
        }
        let declared = schema.get("type").and_then(Value::as_str);
        let actual = type_name(value);
        let type_ok = match declared {
            None => true,
            Some("number") => actual == "integer" || actual == "number",
            Some(t) => t == actual,
        };
        if !type_ok {
            errors.push(format!("{at}: expected {}, found {actual} {value}", declared.unwrap_or("?")));
            return;
        }
        match value {
            Value::Number(n) => self.check_number(schema, n, at, errors),
            Value::Array(items) => {
                if let Some(item_schema) = schema.get("items") {
                    for (i, item) in items.iter().enumerate() {
                        self.check(item_schema, item, &format!("{at}[{i}]"), errors);
                    }
                }
            }
            Value::Object(map) => self.check_object(schema, map, at, errors),
            Value::Null | Value::Bool(_) | Value::String(_) => {}
        }
    }

    fn check_number(&self, schema: &Value, n: &serde_json::Number, at: &str, errors: &mut Vec<String>) {
        let Some(x) = as_i128(n) else { return };
        if let Some(min) = schema.get("minimum").and_then(Value::as_i64) {
            if x < i128::from(min) {
                errors.push(format!("{at}: {x} is below the minimum {min}"));
            }
        }
        if let Some(max) = schema.get("maximum").and_then(Value::as_i64) {
            if x > i128::from(max) {
                errors.push(format!("{at}: {x} is above the maximum {max}"));
            }
        }
        if let Some((lo, hi)) = schema.get("format").and_then(Value::as_str).and_then(format_range) {
            if x < lo || x > hi {
                errors.push(format!("{at}: {x} does not fit {}", schema["format"]));
            }
        }
    }

    fn check_object(&self, schema: &Value, map: &serde_json::Map<String, Value>, at: &str, errors: &mut Vec<String>) {
        let properties = schema.get("properties").and_then(Value::as_object);
        for name in schema.get("required").and_then(Value::as_array).into_iter().flatten() {
            if let Some(name) = name.as_str() {
                if !map.contains_key(name) {
                    errors.push(format!("{at}: required property {name:?} is missing"));
                }
            }
        }
        let additional = schema.get("additionalProperties");
        for (name, v) in map {
            let here = format!("{at}.{name}");
            match (properties.and_then(|p| p.get(name)), additional) {
                (Some(prop), _) => self.check(prop, v, &here, errors),
                (None, Some(Value::Bool(true))) => {}
                (None, Some(extra @ Value::Object(_))) => self.check(extra, v, &here, errors),
                (None, _) => errors.push(format!("{here}: not a property the API defines")),
            }
        }
    }
}

/// Fields the real server takes that the v53.0 document does not list,
/// each added only where the document leaves it out: `RestoreConfig`'s
/// `net_fds` (the server's `RestoreConfig` has had it since v37, with
/// `RestoredNetConfig { id, num_fds, fds }`; the TAPs come as SCM_RIGHTS).
fn add_known_gaps(root: &mut Value) {
    let Some(props) = root.pointer_mut("/components/schemas/RestoreConfig/properties").and_then(Value::as_object_mut) else {
        return;
    };
    props.entry("net_fds").or_insert_with(|| {
        serde_json::json!({
            "type": "array",
            "items": {
                "type": "object",
                "required": ["id"],
                "properties": {
                    "id": {"type": "string"},
                    "num_fds": {"type": "integer", "minimum": 0},
                    "fds": {"type": "array", "items": {"type": "integer"}}
                }
            }
        })
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const DOC: &str = r##"
openapi: 3.0.1
paths:
  /vm.resize:
    put:
      requestBody:
        content:
          application/json:
            schema:
              $ref: "#/components/schemas/Thing"
        required: true
      responses:
        204:
          description: ok
  /vm.boot:
    put:
      responses:
        204:
          description: ok
components:
  schemas:
    Mode:
      type: string
      enum: [Copy, OnDemand]
    Bucket:
      required: [size]
      type: object
      properties:
        size:
          type: integer
          format: int64
          minimum: 0
    Thing:
      required: [name]
      type: object
      properties:
        name: {type: string}
        mode: {$ref: "#/components/schemas/Mode"}
        small: {type: integer, format: uint8}
        buckets:
          type: array
          items: {$ref: "#/components/schemas/Bucket"}
        labels:
          type: object
          additionalProperties: {type: integer}
"##;

    fn errors(value: serde_json::Value) -> Vec<String> {
        let api = OpenApi::parse(DOC).unwrap();
        match api.validate_request("/vm.resize", "PUT", value.to_string().as_bytes()) {
            Ok(()) => Vec::new(),
            Err(e) => e,
        }
    }

    #[test]
    fn a_valid_body_passes() {
        assert!(errors(json!({"name": "x", "mode": "OnDemand", "small": 255, "buckets": [{"size": 0}], "labels": {"a": 1}})).is_empty());
    }

    #[test]
    fn every_kind_of_violation_is_reported_with_its_place() {
        let found = errors(json!({
            "mode": "Ondemand",
            "small": 256,
            "buckets": [{"size": -1, "refill": 1}, {}],
            "labels": {"a": "one"},
            "nmae": "typo"
        }));
        let expect = [
            "$: required property \"name\" is missing",
            "$.mode: \"Ondemand\" is not one of",
            "$.small: 256 does not fit",
            "$.buckets[0].size: -1 is below the minimum 0",
            "$.buckets[0].refill: not a property the API defines",
            "$.buckets[1]: required property \"size\" is missing",
            "$.labels.a: expected integer, found string",
            "$.nmae: not a property the API defines",
        ];
        for e in expect {
            assert!(found.iter().any(|f| f.starts_with(e)), "missing {e:?} in {found:#?}");
        }
        assert_eq!(found.len(), expect.len(), "{found:#?}");
    }

    #[test]
    fn bodies_where_none_belongs_and_unknown_paths_fail() {
        let api = OpenApi::parse(DOC).unwrap();
        assert!(api.validate_request("/vm.boot", "PUT", b"").is_ok());
        assert!(api.validate_request("/vm.boot", "PUT", b"{}").is_err());
        assert!(api.validate_request("/vm.nope", "PUT", b"").is_err());
        assert!(api.validate_request("/vm.resize", "PUT", b"not json").is_err());
    }

    #[test]
    fn the_real_document_loads() {
        let api = OpenApi::load(&OpenApi::bundled()).unwrap();
        let schema = api.request_schema("/vm.create", "PUT").unwrap().expect("vm.create takes a body");
        let minimal = json!({"payload": {"kernel": "/k"}, "memory": {"size": 1, "hotplug_method": "VirtioMem"}});
        api.validate_value(schema, &minimal).unwrap();
        let bad = json!({"payload": {"kernel": "/k"}, "disks": [{"path": "/d", "image_type": "raw"}]});
        assert!(api.validate_value(schema, &bad).is_err());
    }

    /// Where the project's reference folder is at hand (`shared/spec/`
    /// beside or above the checkout, as on the developers' machine), the
    /// bundled copy must be the same document.
    #[test]
    fn the_bundled_copy_is_the_reference_one() {
        let start = Path::new(env!("CARGO_MANIFEST_DIR"));
        let reference = start.ancestors().map(|d| d.join("shared/spec").join(SPEC_FILE)).find(|p| p.is_file());
        if let Some(reference) = reference {
            let ours = std::fs::read(OpenApi::bundled()).unwrap();
            assert!(ours == std::fs::read(&reference).unwrap(), "{} differs from {}", OpenApi::bundled().display(), reference.display());
        }
    }
}
