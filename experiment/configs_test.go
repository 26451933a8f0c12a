package experiment

import (
	"os"
	"testing"
)

// configs/plan.yaml is documented as running as is: it must be a valid plan.
func TestExamplePlanIsValid(t *testing.T) {
	data, err := os.ReadFile("../configs/plan.yaml")
	if err != nil {
		t.Fatal(err)
	}
	p, err := ParsePlan(data)
	if err != nil {
		t.Fatalf("configs/plan.yaml: %v", err)
	}
	if p.Participants.Min != 2 || p.Runner.Model != "mlp" {
		t.Fatalf("configs/plan.yaml parsed as %+v", p)
	}
}
