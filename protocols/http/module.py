"""The HTTP module as the runtime sees it (registered through the
``afpa.modules`` entry point, exactly as a third-party module would be)."""

from afpa.modules import ProtocolModule, collect
from protocols.http import deferred, remote, states
from protocols.http.scopes import HttpGlobal, HttpRequest

MODULE = ProtocolModule(
    name="http",
    functions=collect([*states.FUNCTIONS, *remote.FUNCTIONS, *deferred.FUNCTIONS]),
    table="http.toml",
    companions=("http-backend",),
    make_global=HttpGlobal.build,
    make_request=lambda conn: HttpRequest(),
    fail=states.fail,
    access_line=states.access_line,
)
