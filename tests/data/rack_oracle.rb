# The oracle for tests/it/rack_oracle.rs: real Rack (Debian's ruby-rack, 2.2)
# reading POST requests through Rack::MethodOverride, as Rails does.
#
# Each line of stdin is one request: its Content-Type (empty: none) and its
# body, both in hex, separated by a tab. Each line of stdout is
# the method Rack hands the application, or "ERROR <class>" if reading the
# request raised.
require "rack"

app = ->(env) { [200, {}, [env["REQUEST_METHOD"]]] }
override = Rack::MethodOverride.new(app)
$stdout.sync = false

$stdin.each_line do |line|
  ct_hex, body_hex = line.chomp.split("\t", 2)
  content_type = [ct_hex || ""].pack("H*")
  body = [body_hex || ""].pack("H*")
  env = Rack::MockRequest.env_for(
    "/users/5.json",
    :method => "POST",
    :input => body,
  )
  if content_type.empty?
    env.delete("CONTENT_TYPE")
  else
    env["CONTENT_TYPE"] = content_type
  end
  env["rack.errors"] = StringIO.new
  begin
    _, _, out = override.call(env)
    puts out.join
  rescue StandardError => e
    puts "ERROR #{e.class}"
  end
end
