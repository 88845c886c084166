package main

import (
	"fmt"
	"math"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

const steadDashboard = "../../../deploy/grafana/stead-dashboard.json"

func TestSteadDashboardPasses(t *testing.T) {
	d, err := loadDashboard(steadDashboard)
	if err != nil {
		t.Fatal(err)
	}
	if errs := d.check(); len(errs) > 0 {
		t.Fatalf("%v", errs)
	}
}

func oneTarget(expr string) *dashboard {
	d := &dashboard{}
	d.Templating.List = append(d.Templating.List, struct {
		Name       string `json:"name"`
		Type       string `json:"type"`
		IncludeAll bool   `json:"includeAll"`
		AllValue   string `json:"allValue"`
	}{"instance", "query", true, ".*"})
	d.Panels = []panel{{Type: "row", Title: "R"}, {Type: "timeseries", Title: "P", Targets: []target{{Expr: expr, RefID: "A"}}}}
	return d
}

func TestCheckNamesThePanelAndTheFault(t *testing.T) {
	for expr, want := range map[string]string{
		`sum by (a (rate(stead_x_total{instance=~"$instance"}[5m]))`: "does not parse",
		`rate(stead_x_total[$__rate_interval])`:                      `does not filter on instance=~"$instance"`,
		`rate(stead_x_total{instance=~"$node"}[1m])`:                 "undefined variable $node",
		`up{instance=~"$instance"}`:                                  "names no stead_ series",
	} {
		errs := oneTarget(expr).check()
		if len(errs) != 1 || !strings.HasPrefix(errs[0].Error(), `panel "P" target A: `) || !strings.Contains(errs[0].Error(), want) || !strings.Contains(errs[0].Error(), expr) {
			t.Errorf("%s: want one error %q naming the panel and the expression, got %v", expr, want, errs)
		}
	}
}

func TestRateIntervalIsGrafanas(t *testing.T) {
	if got := rateInterval(5*time.Second, 5*time.Second); got != 20*time.Second {
		t.Errorf("5s scrapes, 5s step: %s", got)
	}
	if got := rateInterval(time.Minute, 15*time.Second); got != 75*time.Second {
		t.Errorf("15s scrapes, 1m step: %s", got)
	}
}

// A capture of one instance whose counter grows by 10 a scrape (5 s), and
// whose gauge is gone after the fifth scrape: the rate is 2/s, and the gauge
// ends at once (a stale marker), not five minutes later.
func TestEvaluateRatesAndStaleness(t *testing.T) {
	dir := t.TempDir()
	inst := filepath.Join(dir, "scrapes", "n1")
	if err := os.MkdirAll(inst, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "meta"), []byte("interval=5\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	t0 := int64(1_800_000_000_000)
	for i := range 12 {
		body := fmt.Sprintf("# TYPE stead_x counter\nstead_x_total{m=\"a\"} %d\n", 10*i)
		if i < 5 {
			body += "# TYPE stead_g gauge\nstead_g 7\n"
		}
		body += "# EOF\n"
		if err := os.WriteFile(filepath.Join(inst, fmt.Sprintf("%d.om", t0+int64(i)*5000)), []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	c, err := openCapture(dir)
	if err != nil {
		t.Fatal(err)
	}
	d := oneTarget(`sum by (m) (rate(stead_x_total{instance=~"$instance"}[$__rate_interval]))`)
	d.Panels = append(d.Panels, panel{Type: "timeseries", Title: "G", Targets: []target{{Expr: `stead_g{instance=~"$instance"}`, RefID: "A"}}})
	out, err := evaluate(d, c, 0)
	if err != nil {
		t.Fatal(err)
	}
	if out.RateInterval != "20s" || out.Step != "5s" {
		t.Errorf("rate interval %s, step %s", out.RateInterval, out.Step)
	}
	rate := out.Panels[0].Targets[0].Series
	if len(rate) != 1 || len(rate[0].Points) == 0 {
		t.Fatalf("rate: %+v", rate)
	}
	for _, p := range rate[0].Points {
		// A window that reaches before the first scrape extrapolates less.
		if p[0].(float64) < float64(t0/1000+20) {
			continue
		}
		if math.Abs(p[1].(float64)-2) > 1e-9 {
			t.Errorf("rate at %v: %v, want 2", p[0], p[1])
		}
	}
	g := out.Panels[1].Targets[0].Series
	if len(g) != 1 {
		t.Fatalf("gauge: %+v", g)
	}
	if last := g[0].Points[len(g[0].Points)-1][0].(float64); last >= float64(t0/1000+25) {
		t.Errorf("the gauge outlives its last scrape (at %d): a point at %v", t0/1000+20, last)
	}
}

func TestSteadDashboardSelectsEveryFamily(t *testing.T) {
	d, err := loadDashboard(steadDashboard)
	if err != nil {
		t.Fatal(err)
	}
	errs, err := checkOverFixture(d, "testdata/every-family.om")
	if err != nil || len(errs) > 0 {
		t.Fatalf("%v %v", err, errs)
	}
}

// A label value the agent never writes selects nothing: the check says so.
func TestFixtureCheckFindsATypo(t *testing.T) {
	d := oneTarget(`sum(rate(stead_provision_duration_seconds_count{instance=~"$instance",outcome="succes"}[$__rate_interval]))`)
	errs, err := checkOverFixture(d, "testdata/every-family.om")
	if err != nil {
		t.Fatal(err)
	}
	if len(errs) != 1 || !strings.Contains(errs[0].Error(), `panel "P" target A: selects no series`) {
		t.Fatalf("want one error about no series, got %v", errs)
	}
}
