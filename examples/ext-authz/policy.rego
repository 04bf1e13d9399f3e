# The decision of `palisade ext-authz` for the productpage example (see README.md).
#
# Callers say who they are with the `x-user` header (in a real mesh this would come from a
# validated JWT). Readers may GET and HEAD; editors may do anything. Anyone else is refused
# with a status and body of our choosing, which the sidecar passes to the client unchanged.
package envoy.authz

import rego.v1

readers := {"alice", "bob"}

editors := {"alice"}

http := input.attributes.request.http

user := http.headers["x-user"]

permitted if {
	user in readers
	http.method in {"GET", "HEAD"}
}

permitted if user in editors

# No x-user at all: ask the caller to identify.
default allow := {
	"allowed": false,
	"http_status": 401,
	"body": "ext-authz: who are you? send an x-user header\n",
	"headers": {"x-ext-authz": "denied"},
}

# Allowed: tell the application who the authorizer let in.
allow := {"allowed": true, "headers": {"x-ext-authz-user": user}} if permitted

allow := {
	"allowed": false,
	"http_status": 403,
	"body": sprintf("ext-authz: %s may not %s %s\n", [user, http.method, http.path]),
	"headers": {"x-ext-authz": "denied"},
} if {
	is_string(user)
	not permitted
}
