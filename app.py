from tunnel_telemetry import create_app

app = create_app()
