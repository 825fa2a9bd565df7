from tunnel_telemetry.web import create_app

app = create_app()
