package broker

import "github.com/prometheus/client_golang/prometheus"

type metrics struct {
	connects        *prometheus.CounterVec
	disconnects     *prometheus.CounterVec
	acceptErrors    *prometheus.CounterVec
	connectTimeouts prometheus.Counter
	tlsFailures     *prometheus.CounterVec
	aclDenials      prometheus.Counter
	pendingRefused  prometheus.Counter
}

func newMetrics() *metrics {
	return &metrics{
		connects: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "fleetd_mqtt_connects_total", Help: "CONNECTs by result: ok, or the reason they were refused.",
		}, []string{"result"}),
		disconnects: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "fleetd_mqtt_disconnects_total", Help: "Ended sessions by reason.",
		}, []string{"reason"}),
		acceptErrors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "fleetd_mqtt_accept_errors_total", Help: "Failed accepts (e.g. out of file descriptors); the listener keeps going.",
		}, []string{"listener"}),
		connectTimeouts: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "fleetd_mqtt_connect_timeouts_total", Help: "Connections closed because no CONNECT arrived in time.",
		}),
		tlsFailures: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "fleetd_mqtt_tls_handshake_failures_total", Help: "Failed TLS handshakes on the MQTT TLS listener, by class.",
		}, []string{"class"}),
		aclDenials: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "fleetd_mqtt_acl_denials_total", Help: "Publishes and subscriptions outside a device's own topics.",
		}),
		pendingRefused: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "fleetd_mqtt_pending_connects_refused_total", Help: "Connections closed at accept because too many connections (overall or from their source) had not sent CONNECT yet.",
		}),
	}
}

func (m *metrics) register(r prometheus.Registerer, b *Broker) {
	r.MustRegister(m.connects, m.disconnects, m.acceptErrors, m.connectTimeouts, m.tlsFailures, m.aclDenials, m.pendingRefused,
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "fleetd_mqtt_sessions", Help: "Live device sessions.",
		}, func() float64 {
			n := 0
			b.sessions.Range(func(_, _ any) bool { n++; return true })
			return float64(n)
		}))
}
